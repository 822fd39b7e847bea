# Stage 1a/1b: the prepared store and the cached sentence embeddings.


rule prepare_dataset:
    input:
        dataset_sources(),
    output:
        images="results/{dataset}/data/images.h5",
        captions="results/{dataset}/data/captions.parquet",
    log:
        "results/logs/{dataset}/prepare_dataset.log",
    benchmark:
        "results/benchmarks/{dataset}/prepare_dataset.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 2
    params:
        cfg=lambda w: stage_json(dataset=section("dataset")),
        out_dir=lambda w, output: str(Path(output.images).parent),
    shell:
        "python -m vldd --threads {threads} prepare-dataset --config-json {params.cfg:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule embed_captions:
    input:
        **data_files("{dataset}"),
    output:
        "results/{dataset}/embeddings/{text}.h5",
    log:
        "results/logs/{dataset}/embed_captions_{text}.log",
    benchmark:
        "results/benchmarks/{dataset}/embed_captions_{text}.tsv"
    conda:
        "../../envs/vldd.yaml"
    threads: 2
    resources:
        gpu=1,
        device=DEVICE,
    params:
        cfg=lambda w: stage_json(model={"text_encoder": config["model"]["text_encoder"]}),
        data=lambda w, input: str(Path(input.images).parent),
    shell:
        "python -m vldd --threads {threads} embed-captions --config-json {params.cfg:q}"
        " --data {params.data:q} --out {output:q} --device {resources.device:q} > {log:q} 2>&1"
