"""`python jobs/pipeline.py [key=value ...]`: generate -> prepare -> train -> evaluate -> export,
then a Serve demo on the exported model (skip it with pipeline.serve_demo=false)."""

import hydra

from adrec import pipeline


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    results = pipeline.run(cfg)
    if cfg.pipeline.serve_demo and "export" in results:
        from serve import demo  # the Serve app is only needed for the demo

        demo.run(cfg)


if __name__ == "__main__":
    main()
