"""``python -m fedjax_kd``: the ``fedjax-kd`` command (see :mod:`fedjax_kd.cli`)."""

from fedjax_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
