"""vldd: vision-language dataset distillation as a Snakemake pipeline."""

__version__ = "0.1.0"
