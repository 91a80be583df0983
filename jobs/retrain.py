"""`python jobs/retrain.py [key=value ...]`: compact feedback, retrain from the serving version, promote if better."""

import hydra

from adrec.feedback import retrain as stage
from adrec.runtime import print_result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(stage.run(cfg))


if __name__ == "__main__":
    main()
