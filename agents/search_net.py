"""The search policy's network: one small MLP scores every candidate mask from its row of the
search observation (a learned acquisition function, as in MetaBO, Volpp et al. ICLR 2020), so the
same weights serve any task and a mask already tried is never proposed again.

Each logit is a learned correction added to the ``gp-prior`` baseline's acquisition (the
calibrated posterior's mean before any result, the portfolio score at the portfolio steps, the log
of the calibrated expected improvement after), so an
untrained network searches as ``gp-prior`` does and PPO only has to learn where to depart from it
(MetaBO's fallback to Bayesian optimisation, built into the parametrisation). The correction applies
only once the search has a result: the first pick is always the prior's (trained corrections to it
overfit the training tasks and raised regret at 1 fine-tune, 2026-12-03)."""

from __future__ import annotations

import math
from typing import Any

import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from memrl.episode import CANDIDATE_FEATURES, SEARCH_GLOBALS, TRIED

__all__ = [
    "CALIBRATED_EI",
    "CALIBRATED_MEAN",
    "CandidatePolicy",
    "CandidateScorer",
    "EI_FLOOR",
    "HAS_TRIED",
    "PORTFOLIO_SCORE",
    "PORTFOLIO_STEP",
    "PRIOR_TEMPERATURE",
    "TIE_BREAK",
    "TRANSFER_REGRET",
    "TRIED_PENALTY",
    "baseline_acquisition",
]

TRIED_PENALTY = 1e4
"""Subtracted from a tried mask's logit: its probability is 0 to float precision."""
CALIBRATED_MEAN = CANDIDATE_FEATURES.index("calibrated_mean")
CALIBRATED_EI = CANDIDATE_FEATURES.index("calibrated_improvement")
PORTFOLIO_SCORE = CANDIDATE_FEATURES.index("portfolio_score")
HAS_TRIED = SEARCH_GLOBALS.index("has_tried")
PORTFOLIO_STEP = SEARCH_GLOBALS.index("portfolio_step")
PRIOR_TEMPERATURE = 3.0
"""Initial weight of the baseline acquisition in the logits (learned): the untrained policy's
probabilities are a softmax of 3 x the calibrated mean (results' spread units), 3 x the portfolio
score (candidates' spread units) or 3 x the log expected improvement, so it samples near
``gp-prior``'s pick and its most probable mask is that pick."""
EI_FLOOR = 1e-3
"""Added to the expected improvement before its log (in units of the results' spread)."""
TIE_BREAK = 1e-3
"""Times the prior's ``transfer_regret``, subtracted from every logit: equal scores go to the mask the
training tasks favour (as ``memrl.episode.best_candidate`` breaks ``gp-prior``'s ties)."""
TRANSFER_REGRET = CANDIDATE_FEATURES.index("transfer_regret")


def baseline_acquisition(rows: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """``gp-prior``'s score of every candidate from its observation rows (batch, masks, features):
    the calibrated mean before the search has a result, the portfolio score at a portfolio step,
    the log expected improvement otherwise."""
    first = rows[..., CALIBRATED_MEAN]
    later = torch.log(rows[..., CALIBRATED_EI].clamp_min(0) + EI_FLOOR)
    later = torch.where(glob[:, PORTFOLIO_STEP : PORTFOLIO_STEP + 1] > 0, rows[..., PORTFOLIO_SCORE], later)
    return torch.where(glob[:, HAS_TRIED : HAS_TRIED + 1] > 0, later, first)


class CandidateScorer(nn.Module):
    """Shared per-candidate MLP over (candidate row, episode-wide values) giving each mask's
    correction to :func:`baseline_acquisition` (times a learned temperature); the value is read
    from the mean and max of the candidates' hidden units.

    Args:
        candidates: masks of the space (2**K); widths: hidden layer widths (``ppo.net_arch``).
    """

    def __init__(self, candidates: int, widths: list[int]) -> None:
        super().__init__()
        self.candidates = candidates
        self.globals, self.features = len(SEARCH_GLOBALS), len(CANDIDATE_FEATURES)
        layers: list[nn.Module] = []
        width = self.features + self.globals
        for w in widths:
            layers += [nn.Linear(width, w), nn.Tanh()]
            width = w
        self.body = nn.Sequential(*layers)
        self.logit = nn.Linear(width, 1)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(PRIOR_TEMPERATURE)))
        self.critic = nn.Sequential(nn.Linear(2 * width + self.globals, width), nn.Tanh())
        self.latent_dim_pi, self.latent_dim_vf = candidates, width

    def _hidden(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        glob = obs[:, : self.globals]
        rows = obs[:, self.globals :].reshape(len(obs), self.candidates, self.features)
        both = torch.cat([rows, glob[:, None, :].expand(-1, self.candidates, -1)], dim=2)
        return glob, rows, self.body(both)

    def _logits(self, glob: torch.Tensor, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        acquisition = self.log_temperature.exp() * baseline_acquisition(rows, glob)
        prior = acquisition - TIE_BREAK * rows[..., TRANSFER_REGRET]
        # the first pick has no result to learn from (a contextual bandit, which the prior's
        # average over training tasks already answers): the correction starts with the search
        correction = self.logit(hidden).squeeze(-1) * glob[:, HAS_TRIED : HAS_TRIED + 1]
        return prior + correction - TRIED_PENALTY * rows[..., TRIED]

    def _value(self, glob: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([hidden.mean(dim=1), hidden.amax(dim=1), glob], dim=1))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        glob, rows, hidden = self._hidden(obs)
        return self._logits(glob, rows, hidden), self._value(glob, hidden)

    def forward_actor(self, obs: torch.Tensor) -> torch.Tensor:
        glob, rows, hidden = self._hidden(obs)
        return self._logits(glob, rows, hidden)

    def forward_critic(self, obs: torch.Tensor) -> torch.Tensor:
        glob, _, hidden = self._hidden(obs)
        return self._value(glob, hidden)


class CandidatePolicy(ActorCriticPolicy):
    """SB3 actor-critic whose action logits are :class:`CandidateScorer`'s per-mask scores
    (``Discrete(2**K)`` actions; ``net_arch``: the scorer's hidden widths)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.widths = list(kwargs.pop("net_arch", None) or [64, 64])
        super().__init__(*args, **{**kwargs, "net_arch": []})

    def _build_mlp_extractor(self) -> None:
        n = int(self.action_space.n)  # type: ignore[attr-defined]
        self.mlp_extractor = CandidateScorer(n, self.widths)  # type: ignore[assignment]

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()  # the scorer's logits are the action logits
        scorer: Any = self.mlp_extractor
        nn.init.zeros_(scorer.logit.weight)  # the correction starts at 0: the policy starts as gp-prior
        nn.init.zeros_(scorer.logit.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]
