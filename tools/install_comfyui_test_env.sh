#!/usr/bin/env bash
# The real-ComfyUI test environment, into the active virtualenv (which already has torch and `pip install -e .[test]`):
# ComfyUI 0.27.0 unpacked into DEST (outside the repository), its requirements beside the installed CPU torch, and
# Debian's chromium for the browser tests. Then run the tests with COMFYUI_DIR=DEST/ComfyUI.
#
#   bash tools/install_comfyui_test_env.sh [DEST]      (default DEST: ~/.cache/sidestep/comfyui-0.27.0)
#
# ComfyUI's source comes from COMFYUI_TARBALL (default: ../shared/vendor/comfyui-0.27.0-77917ed3.tar.gz beside the
# repository). ComfyUI's requirements are installed without torch/torchvision/torchaudio and with torch pinned to the
# installed version: otherwise spandrel pulls torchvision, which replaces the CPU torch with a multi-GB CUDA build.
# The test harness stands in for torchvision/torchaudio, which nothing ACE-Step uses needs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$HOME/.cache/sidestep/comfyui-0.27.0}"
tarball="${COMFYUI_TARBALL:-$repo/../shared/vendor/comfyui-0.27.0-77917ed3.tar.gz}"
case "$(cd "$(dirname "$dest")" 2>/dev/null && pwd)/" in
  "$repo"/*) echo "DEST must be outside the repository: $dest" >&2; exit 2 ;;
esac

if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ ! -f "$dest/ComfyUI/main.py" ]; then
  [ -f "$tarball" ] || { echo "no ComfyUI source at $tarball (set COMFYUI_TARBALL)" >&2; exit 2; }
  mkdir -p "$dest"
  tar xzf "$tarball" -C "$dest"
fi

torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
req="$(mktemp)"
grep -vE '^(torch|torchvision|torchaudio|spandrel)\b' "$dest/ComfyUI/requirements.txt" > "$req"
python -m pip install --quiet -r "$req" -c <(echo "torch==$torch_version")
python -m pip install --quiet --no-deps spandrel
rm -f "$req"
echo "COMFYUI_DIR=$dest/ComfyUI"
