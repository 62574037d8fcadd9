"""`python -m hybrid_codec.sd_latents DIR --out OUT` is `hybrid-codec sd-latents DIR --out OUT`: the
entry point torchrun starts, one process per rank (`sd_dataset.write_shards` does the work)."""

if __name__ == "__main__":
    import sys

    from .cli import main

    sys.argv[1:1] = ["sd-latents"]
    main()
