#!/usr/bin/env bash
# Download CelebA's aligned and cropped faces (img_align_celeba.zip from the dataset's Google Drive:
# 202,599 JPEGs, 1.4 GB zipped, about 3 GB of free disk needed while unzipping) into ./img_align_celeba,
# the folder train.py reads by default.
#
#   bash download_dataset.sh [FOLDER]        (default FOLDER: img_align_celeba)
#
# Needs gdown (pip install gdown) and unzip. Safe to run again: it does nothing when FOLDER already holds
# images, and a failed run never leaves a half-extracted FOLDER behind.
# CelebA is only one choice: any folder of colour photos can be used with  python train.py --data FOLDER
set -euo pipefail

DEST="${1:-img_align_celeba}"
DRIVE_ID="0B7EVK8r0v71pZjFTYXZWM3FlRnM"  # Google Drive id of CelebA's img_align_celeba.zip

die() {
  echo "error: $*" >&2
  exit 1
}

if [ "$DEST" = "-h" ] || [ "$DEST" = "--help" ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
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
