"""``python -m fedjax_kd.bench [options]``: the benchmark without the ``fedjax-kd`` wrapper."""

from fedjax_kd.bench.cli import main

raise SystemExit(main())
