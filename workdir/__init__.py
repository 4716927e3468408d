"""A run's workdir and its placement on this host, below training/, sampling/ and interop/.

files.py (config.json), resume.py (which saved-config fields a resumed run may change),
runinfo.py (run.json), checkpoints.py (the checkpoint layout, integrity checks, params-only
restore and save), integrity.py (sha256 manifests), mesh.py (the device mesh of a config and
parameter shardings), hostenv.py (process set-up before JAX starts).
"""
