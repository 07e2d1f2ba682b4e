"""The Kubernetes operator for ``SearchIndex`` (``searchindexes.vsearch.io``): blue-green model
rollouts with a quality gate, one alias switch, rollback, retention and clean-up.

- ``searchindex.yaml`` / ``crd.py``: the CRD and validation against its schema; ``rbac.yaml``.
- ``spec.py``: a typed view of the spec; names of what one model version gets.
- ``rollout.py``: the state machine (pure, idempotent steps; all state on the object's status).
- ``gate.py``: the quality gate (self-consistency, golden set).
- ``training.py``: the learning loop (``spec.training``): when to train, the TrainJob or indexed Job
  (``train_node.py``: what its pods run), the trained version's verdict and rollout target;
  ``cron.py``: its schedules; ``pods.py``: the security context every pod gets.
- ``workloads.py``: the workload-layer interface and its Kubernetes implementation
  (``vsearch.local.workloads`` has the local-process one).
- ``kafka_groups.py``: committed offsets and deletion of a version's consumer group.
- ``handlers.py`` / ``cli.py``: kopf handlers and ``vsearch operator``.
- ``failpoints.py``: crash points for the tests.

Nothing below this package imports it."""

# This folder is the package vsearch.operators (the checkout's operators/ links here). Imported under any other
# name (`import operators` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.operators":
    raise ImportError(f"import vsearch.operators, not {__name__}: operators/ is a link to the package vsearch.operators")
