"""`python jobs/train.py [key=value ...]`: the train stage alone (see conf/config.yaml)."""

import hydra

from adrec.runtime import print_result
from adrec.train import driver as stage


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(stage.run(cfg))


if __name__ == "__main__":
    main()
