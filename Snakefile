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
include: "workflow/rules/prepare_dataset.smk"
include: "workflow/rules/embed_captions.smk"
include: "workflow/rules/train_expert.smk"
include: "workflow/rules/shortcut_expert.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/select_coreset.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/summarize.smk"
include: "workflow/rules/figures.smk"


# "gpu" counts GPUs on this machine; under SLURM each job gets its own (see profiles/).
resource_scopes:
    gpu="local",


rule all:
    default_target: True
    input:
        get_final_output(),
