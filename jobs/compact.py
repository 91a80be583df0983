"""`python jobs/compact.py [key=value ...]`: feedback segments -> Parquet partitions of the behaviour log."""

import hydra

from adrec.feedback import compact as stage
from adrec.runtime import print_result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(stage.run(cfg))


if __name__ == "__main__":
    main()
