"""execution: Ray's side of a run. Starting hosts, feeding them blocks, committing rows.

Holds the driver (`rayq.run` ends here), Tune's plug-ins (searcher, callback, stopper), the
host pool, the fidelity baseline's orchestration, the live cluster's shape and progress.
May import: catalog, planning, store, errors, and of the host layer only its contract
(rayq.host.protocol, rayq.host.config): an engine's class is imported by its path inside its
own Ray actor. Never torch: the driver process stays light.
"""
