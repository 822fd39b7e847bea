# Stage 4': coreset baselines, n real pairs chosen by a rule (config/README.md, `coresets`).
# random needs only the data; herding and kcenter embed the pairs with expert 0's final
# parameters; forgetting trains one model with the experts' settings (a GPU job, as they are).


rule select_coreset:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
        expert=coreset_expert,
    output:
        "results/{dataset}/coresets/{model}/{kind}/n{n}/pairs.h5",
    log:
        "results/logs/{dataset}/coresets/{model}/{kind}/n{n}.log",
    benchmark:
        "results/benchmarks/{dataset}/coresets/{model}/{kind}/n{n}.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=lambda w: 0 if w.kind == "random" else 1,
        device=DEVICE,
    params:
        cfg=coreset_json,
        data=lambda w, input: str(Path(input.images).parent),
        expert=lambda w, input: ["--experts", input.expert] if input.expert else [],
    shell:
        "python -m vldd --threads {threads} select-coreset --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --kind {wildcards.kind:q}"
        " {params.expert:q} --budget {wildcards.n} --out {output:q}"
        " --device {resources.device:q} > {log:q} 2>&1"
