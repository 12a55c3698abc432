"""Vulkan driver check: ManiSkill3/SAPIEN render through Vulkan even for state observations."""

from __future__ import annotations

import ctypes
import glob
import os

from configs.errors import UserError

INSTALL_HINT = (
    "ManiSkill3 needs a Vulkan driver, also on machines without a GPU.\n"
    "  - NVIDIA GPU: install the NVIDIA driver (it ships the Vulkan ICD).\n"
    "  - CPU only (Debian 12): run `make install` as root, or yourself as root:\n"
    "      bash scripts/install_vulkan.sh\n"
    "    which installs Mesa >= 24 lavapipe (`mesa-vulkan-drivers` and `libvulkan1` from\n"
    "    bookworm-backports; Mesa 22 fails with 'failed to find a rendering device').\n"
    "  - If a driver is installed in a non-standard place, point VK_DRIVER_FILES (or\n"
    "    VK_ICD_FILENAMES) at its ICD json file."
)


class VulkanDriverMissing(UserError, RuntimeError):
    """No usable Vulkan driver; the message says how to install one."""


def _icd_files() -> list[str]:
    explicit = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
    if explicit:
        return [f for f in explicit.split(os.pathsep) if os.path.isfile(f)]
    files = []
    for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d",
              os.path.expanduser("~/.local/share/vulkan/icd.d")):
        files += glob.glob(os.path.join(d, "*.json"))
    return files


def check_vulkan() -> None:
    """Raise :class:`VulkanDriverMissing` unless a Vulkan loader and a driver are present."""
    try:
        ctypes.CDLL("libvulkan.so.1")
    except OSError:
        raise VulkanDriverMissing("the Vulkan loader (libvulkan.so.1) is not installed.\n" + INSTALL_HINT) from None
    if not _icd_files():
        raise VulkanDriverMissing("no Vulkan driver (ICD json) was found.\n" + INSTALL_HINT)


def ensure_runtime_dir() -> None:
    """SAPIEN's renderer wants XDG_RUNTIME_DIR; give it a private one if unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = f"/tmp/xdg-runtime-{os.getuid()}"
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = path
