# Stage 3: expert trajectories, one job per expert (parallel; one GPU each).


rule train_expert:
    input:
        **data_files("{dataset}"),
        embeddings=embeddings_file("{dataset}"),
    output:
        "results/{dataset}/experts/{model}/expert_{i}.h5",
    log:
        "results/logs/{dataset}/experts/{model}/expert_{i}.log",
    benchmark:
        "results/benchmarks/{dataset}/experts/{model}/expert_{i}.tsv"
    priority: 20
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(model=config["model"], experts=section("experts")),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} train-expert --config-json {params.cfg:q}"
        " --data {params.data:q} --embeddings {input.embeddings:q} --index {wildcards.i}"
        " --out {output:q} --device {resources.device:q} > {log:q} 2>&1"
