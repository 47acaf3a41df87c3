#!/usr/bin/env bash
# Download CelebA's aligned and cropped faces (img_align_celeba.zip from the dataset's Google Drive:
# 202,599 JPEGs, 1.4 GB zipped, about 3 GB of free disk needed while unzipping) into ./img_align_celeba,
# the folder train.py reads by default; or, with --scenes, photos that are not faces (fastai's Imagenette,
# ten ImageNet classes at short side 160: 9,469 training JPEGs, 94 MB) into ./imagenette, for --scene-data.
#
#   bash download_dataset.sh [FOLDER]             (default FOLDER: img_align_celeba)
#   bash download_dataset.sh --scenes [FOLDER]    (default FOLDER: imagenette)
#
# Needs gdown (pip install gdown) and unzip for CelebA, curl and tar for Imagenette. Safe to run again: it
# does nothing when FOLDER already holds images, and a failed run never leaves a half-extracted FOLDER behind.
# Any folder of colour photos can be used:  python train.py --data FACES --scene-data SCENES
set -euo pipefail

SCENES=0
if [ "${1:-}" = "--scenes" ]; then
  SCENES=1
  shift
fi
DEST="${1:-$([ "$SCENES" = 1 ] && echo imagenette || echo img_align_celeba)}"
DRIVE_ID="0B7EVK8r0v71pZjFTYXZWM3FlRnM"  # Google Drive id of CelebA's img_align_celeba.zip
IMAGENETTE_URL="https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"

die() {
  echo "error: $*" >&2
  exit 1
}

if [ "$DEST" = "-h" ] || [ "$DEST" = "--help" ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

count_images() {
  find "$1" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l | tr -d ' '
}

if [ -d "$DEST" ]; then
  n=$(count_images "$DEST")
  if [ "$n" -gt 0 ]; then
    echo "$DEST already has $n images: nothing to download."
    exit 0
  fi
  [ -z "$(ls -A "$DEST")" ] ||
    die "$DEST exists and holds no images, but other files: move it away or pick another folder"
elif [ -e "$DEST" ]; then
  die "$DEST exists and is not a folder"
fi

if [ "$SCENES" = 1 ]; then
  command -v curl >/dev/null 2>&1 || die "curl is not installed; install it with your package manager"
  command -v tar >/dev/null 2>&1 || die "tar is not installed; install it with your package manager"
  parent=$(dirname "$DEST")
  mkdir -p "$parent"
  work=$(mktemp -d "$parent/.imagenette_download.XXXXXX") || die "cannot create a temporary folder in $parent"
  trap 'rm -rf "$work"' EXIT
  echo "Downloading imagenette2-160.tgz (94 MB) ..."
  curl -fsSL "$IMAGENETTE_URL" -o "$work/imagenette.tgz" || die "the download failed (no network?): $IMAGENETTE_URL"
  tar -xzf "$work/imagenette.tgz" -C "$work" 2>/dev/null || die "the downloaded file is not a valid .tgz archive"
  # the training split only, one flat folder (ImageNet's file names are unique); val/ is for evaluating
  mkdir "$work/photos"
  find "$work" -path '*/train/*' -type f -iname '*.jpeg' -exec mv -t "$work/photos" {} +
  n=$(count_images "$work/photos")
  [ "$n" -gt 0 ] || die "the archive holds no training images"
  if [ -d "$DEST" ]; then rmdir "$DEST"; fi  # empty (checked above): replaced as a whole
  mv "$work/photos" "$DEST"
  echo "done: $n images in $DEST. Train with:  python train.py --data img_align_celeba --scene-data $DEST"
  exit 0
fi

command -v gdown >/dev/null 2>&1 || die "gdown is not installed; install it with: pip install gdown"
command -v unzip >/dev/null 2>&1 ||
  die "unzip is not installed; install it with your package manager (e.g. apt-get install unzip)"

parent=$(dirname "$DEST")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.celeba_download.XXXXXX") || die "cannot create a temporary folder in $parent"
trap 'rm -rf "$work"' EXIT

zip="$work/img_align_celeba.zip"
echo "Downloading img_align_celeba.zip (1.4 GB) from Google Drive ..."
if ! gdown "https://drive.google.com/uc?id=$DRIVE_ID" -O "$zip" || [ ! -s "$zip" ]; then
  die "the download failed: no network, or Google Drive's daily quota for this file is used up (try again later,
or download img_align_celeba.zip by hand from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unzip it here)"
fi
# a quota or permission page saved in place of the file is not a zip
unzip -tq "$zip" >/dev/null 2>&1 ||
  die "the downloaded file is not a valid zip (Google Drive may have sent an error page); try again later"

echo "Unzipping ..."
unzip -q "$zip" -d "$work/x" || die "unzipping failed (is the disk full?)"
src="$work/x/img_align_celeba"
[ -d "$src" ] || src="$work/x"
n=$(count_images "$src")
[ "$n" -gt 0 ] || die "the zip holds no images"
if [ -d "$DEST" ]; then rmdir "$DEST"; fi  # empty (checked above): replaced as a whole
mv "$src" "$DEST"
echo "done: $n images in $DEST. Train with:  python train.py --data $DEST"
