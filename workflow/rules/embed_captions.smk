# Stage 2: the frozen text encoder over every caption, cached.


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
