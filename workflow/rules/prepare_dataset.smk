# Stage 1: the prepared store (images.h5 + captions.parquet).


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
