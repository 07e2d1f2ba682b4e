"""The whole platform on one machine, for ``vsearch demo``, the tests and the benchmarks: local
processes (``services``), sample photos and tiny model configurations (``samples``), the demo
(``demo``), and the operator's workload layer on local processes (``workloads``,
``demo_rollout``). The command line imports it only inside the ``demo`` handler; nothing in
the components imports it."""
