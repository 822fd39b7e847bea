# Stage 3': coreset baselines, n real pairs chosen by a rule.


rule select_coreset:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
    output:
        "results/{dataset}/coresets/{model}/{kind}/n{n}/pairs.h5",
    log:
        "results/logs/{dataset}/coresets/{model}/{kind}/n{n}.log",
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    params:
        cfg=lambda w: stage_json(model=config["model"], coresets=section("coresets", ["kinds"])),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} select-coreset --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --kind {wildcards.kind:q}"
        " --budget {wildcards.n} --out {output:q} > {log:q} 2>&1"
