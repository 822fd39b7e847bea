# Stage 4: bi-trajectory matching into a pair set of n pairs.


rule distill:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
        experts=expert_files,
    output:
        pairs="results/{dataset}/distilled/{model}/{method}/n{n}/pairs.h5",
        curve="results/{dataset}/distilled/{model}/{method}/n{n}/curve.parquet",
    log:
        "results/logs/{dataset}/distilled/{model}/{method}/n{n}.log",
    benchmark:
        "results/benchmarks/{dataset}/distilled/{model}/{method}/n{n}.tsv"
    priority: 10
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(model=config["model"], distill=distill_section(w.method)),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} distill --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --experts {input.experts:q}"
        " --budget {wildcards.n} --out {output.pairs:q} --curve {output.curve:q}"
        " --device {resources.device:q} > {log:q} 2>&1"
