"""Benchmarks, ``python run.py bench {generate,step,compare,overhead,ttsd,verifier,sandbox}``: each module's
``main(args)`` is one subcommand (imported by :mod:`amrsd_jax.cli` only when it runs) and
:mod:`.harness` holds what they share. A leaf of the package: no other module imports it."""
