# Stage 7: figures (matplotlib, in results/figures and in `snakemake --report results/report.html`).


rule figure_distilled:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
        pairs="results/{dataset}/distilled/{model}/{method}/n{n}/pairs.h5",
        curve="results/{dataset}/distilled/{model}/{method}/n{n}/curve.parquet",
    output:
        examples=report(
            "results/figures/{dataset}/{model}/{method}/n{n}/examples.png",
            caption="../report/examples.rst",
            category="Distilled data",
            subcategory="{method}, {n} pairs",
        ),
        curve=report(
            "results/figures/{dataset}/{model}/{method}/n{n}/curve.png",
            caption="../report/curve.rst",
            category="Distillation",
            subcategory="{method}, {n} pairs",
        ),
    log:
        "results/logs/{dataset}/figures/{model}/{method}/n{n}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd figures --data {params.data:q} --embeddings {input.embeddings:q}"
        " --pairs {input.pairs:q} --curve {input.curve:q} --out-examples {output.examples:q}"
        " --out-curve {output.curve:q} > {log:q} 2>&1"


rule figure_recall:
    input:
        "results/tables/retrieval.parquet",
    output:
        report(
            "results/figures/recall_vs_budget.png",
            caption="../report/recall.rst",
            category="Retrieval",
        ),
    log:
        "results/logs/figures/recall_vs_budget.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m vldd figures --table {input:q} --out-recall {output:q} > {log:q} 2>&1"
