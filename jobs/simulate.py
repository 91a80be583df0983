"""`python jobs/simulate.py [key=value ...]`: the closed loop against the live Serve app (run jobs/pipeline.py first)."""

import hydra

from adrec.runtime import print_result
from serve import launch


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    print_result(launch.run_simulation(cfg))


if __name__ == "__main__":
    main()
