"""`python jobs/select_model.py [key=value ...]`: train each user encoder, keep the best on validation (see adrec/train/select.py)."""

import hydra

from adrec.runtime import print_result
from adrec.train import select as stage


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(stage.run(cfg))


if __name__ == "__main__":
    main()
