# Stage 5: a fresh model trained on a pair set (or on all data), then test retrieval.


rule evaluate:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
        pairs=pairset_file,
    output:
        "results/{dataset}/eval/{model}/{source}/n{n}/seed{seed}.parquet",
    log:
        "results/logs/{dataset}/eval/{model}/{source}/n{n}/seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/eval/{model}/{source}/n{n}/seed{seed}.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(model=config["model"], evaluate=section("evaluate")),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} evaluate --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --pairs {input.pairs:q}"
        " --seed {wildcards.seed} --dataset {wildcards.dataset:q} --out {output:q}"
        " --device {resources.device:q} > {log:q} 2>&1"


rule evaluate_cross:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
        pairs=pairset_file,
    output:
        "results/{dataset}/eval/{model}/cross-{arch}/{source}/n{n}/seed{seed}.parquet",
    log:
        "results/logs/{dataset}/eval/{model}/cross-{arch}/{source}/n{n}/seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/eval/{model}/cross-{arch}/{source}/n{n}/seed{seed}.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(
            model=cross_model(w.arch),
            evaluate=section("evaluate"),
        ),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} evaluate --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --pairs {input.pairs:q}"
        " --seed {wildcards.seed} --dataset {wildcards.dataset:q} --out {output:q}"
        " --device {resources.device:q} > {log:q} 2>&1"


rule train_full:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
    output:
        "results/{dataset}/eval/{model}/full/seed{seed}.parquet",
    log:
        "results/logs/{dataset}/eval/{model}/full/seed{seed}.log",
    benchmark:
        "results/benchmarks/{dataset}/eval/{model}/full/seed{seed}.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(model=config["model"], full=section("full")),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} train-full --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --seed {wildcards.seed}"
        " --dataset {wildcards.dataset:q} --out {output:q} --device {resources.device:q}"
        " > {log:q} 2>&1"
