"""beluga-testbed: emulated CXL memory pools shared by QEMU hosts."""
