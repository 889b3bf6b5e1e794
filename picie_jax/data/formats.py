"""Facts of the file formats the data path reads, defined once for the dataset readers, the
header scan, the config check and `segment`."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the files an image directory's listing picks up
IGNORE_VALUE = 255  # the label value image folders use for unlabelled pixels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG file's first 8 bytes
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap height and width
