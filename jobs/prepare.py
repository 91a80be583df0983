"""`python jobs/prepare.py [key=value ...]`: the prepare stage alone (see conf/config.yaml)."""

import hydra

from adrec.data import prepare as stage
from adrec.runtime import print_result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(stage.run(cfg))


if __name__ == "__main__":
    main()
