"""Actor pools are sized so every stage can run at once (else Ray Data waits forever)."""
import pytest

from vpo_ray.config import ConfigError, StageConfig
from vpo_ray.pipeline.generate import fit_stages


def test_cpu_requests_scale_down_to_fit():
    stages = {k: StageConfig(num_cpus=1.0) for k in ("rewrite", "judge", "t2v", "video_judge")}
    scale = fit_stages(stages, {"CPU": 2.0})
    assert sum(s.num_cpus * s.min_actors * scale for s in stages.values()) <= 2.0
    assert fit_stages(stages, {"CPU": 8.0}) == 1.0


def test_too_few_gpus_names_the_stages():
    stages = {"rewrite": StageConfig(num_gpus=1.0), "t2v": StageConfig(num_gpus=1.0, min_actors=2)}
    with pytest.raises(ConfigError, match=r"3 GPUs.*t2v_stage: 2 x 1"):
        fit_stages(stages, {"CPU": 16.0, "GPU": 2.0})
    assert fit_stages({"t2v": StageConfig(num_gpus=0.5), "judge": StageConfig(num_gpus=0.5)},
                      {"CPU": 4.0, "GPU": 1.0}) == 1.0
