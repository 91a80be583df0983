"""`python jobs/tune.py experiment=<name> [key=value ...]`: hyperparameter search on Ray Tune over
conf/tune/space/<name>.yaml; writes the best settings to conf/experiment/tuned/<name>.yaml
(see conf/tune/search.yaml and docs/tuning.md)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from adrec import tune
from adrec.runtime import print_result

CONF = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(config_path="../conf", config_name="tune/search", version_base="1.3")
def main(cfg) -> None:
    hydra_cfg = HydraConfig.get()
    command = " ".join(["python jobs/tune.py", *hydra_cfg.overrides.task])
    report = tune.run(cfg, experiment=hydra_cfg.runtime.choices.experiment, conf_dir=CONF, command=command)
    print_result({k: report[k] for k in ("best", "overlay", "search_dir", "seconds")})  # every trial: search.json


if __name__ == "__main__":
    main()
