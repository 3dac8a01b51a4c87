"""Issue: the built image boots under QEMU and runs a command over SSH."""
import json

from testbed import image

from .conftest import cli


def test_image_boots_and_answers_over_ssh():
    img = image.find_image()
    cli("up", "1host-1switch", "--name", "boot", "--no-provision")
    try:
        r = cli("exec", "boot", "host0", "--", "uname", "-r")
        assert r.stdout.strip() == img.manifest["kernel_version"]
        r = cli("exec", "boot", "host0", "--", "cat /proc/cmdline; hostname; cxl version")
        cmdline, hostname, cxl_version = r.stdout.strip().splitlines()
        assert "modprobe.blacklist=kmem" in cmdline and hostname == "host0" and cxl_version == "81"
        st = json.loads(cli("status", "boot", "--json").stdout)
        assert st["accel"] == "tcg" and st["hosts"][0]["state"] == "running"
    finally:
        cli("down", "boot")
