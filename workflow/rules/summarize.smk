# Stage 6: the tables people read.


rule summarize:
    input:
        eval_files(),
        included_eval_files(),
    output:
        parquet="results/tables/retrieval.parquet",
        md=report("results/tables/retrieval.md", category="Retrieval"),
        ablations=report("results/tables/ablations.md", category="Retrieval"),
    log:
        "results/logs/summarize.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        method=config["distill"]["method"],
    shell:
        "python -m vldd summarize --inputs {input:q} --out-parquet {output.parquet:q}"
        " --out-md {output.md:q} --out-ablations {output.ablations:q}"
        " --main-method {params.method:q} > {log:q} 2>&1"
