# vldd: vision-language dataset distillation (Wu, Zhang, Deng, Russakovsky, TMLR 2024).
#
#   snakemake --cores 8                  the whole pipeline on config/config.yaml
#   snakemake --workflow-profile profiles/slurm   the same through SLURM
#   snakemake distill                    one stage (and whatever it needs)
#
# Stages, data flow and output layout: README.md and results/README.md.

from snakemake.utils import min_version

min_version("9.12")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/experts.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/coresets.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# "gpu" counts GPUs on this machine; under SLURM each job gets its own (see profiles/).
resource_scopes:
    gpu="local",


rule all:
    default_target: True
    input:
        get_final_output(),
