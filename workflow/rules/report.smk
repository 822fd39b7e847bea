# Stage 5: the tables people read.


rule summarize:
    input:
        eval_files(),
    output:
        parquet="results/tables/retrieval.parquet",
        md=report("results/tables/retrieval.md", category="Retrieval"),
    log:
        "results/logs/summarize.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m vldd summarize --inputs {input:q} --out-parquet {output.parquet:q}"
        " --out-md {output.md:q} > {log:q} 2>&1"
