"""amrsd_jax: RL with verifiable rewards on language models, with token-level credit assignment."""

__version__ = "0.1.0"
