//! What an operator asks for ([`DeploymentSpec`]) and how it becomes a rollout [`Plan`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rollout::{
    Bake, Budget, CanaryStep, Gates, HealthGate, HostSpec, Limit, ManifestId, Plan, RegionIndex,
    StageAhead, Strategy, Timeouts,
};

/// The strategy of a deployment, as asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Batches within the disruption budget.
    Rolling,
    /// Steps of a growing share of each region (the default).
    #[default]
    Canary,
    /// The new release started beside the old one, then a switch.
    BlueGreen,
}

/// What to do when a deployment of the same service and environment is in progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Queue it (hotfixes ahead of the others); it starts when the running one ends.
    #[default]
    Queue,
    /// Refuse it.
    Refuse,
}

/// A deployment request (`POST /api/v1/deployments`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// The service.
    pub service: String,
    /// The version (registered, and promoted to `environment`).
    pub version: String,
    /// The environment.
    pub environment: String,
    /// The strategy.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// Canary steps, cumulative percentages of each region ending at 100 (default 1, 5, 25, 50,
    /// 100).
    #[serde(default)]
    pub canary_steps: Vec<u32>,
    /// Regions in rollout order; empty: every region of the environment's hosts, by name.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Most hosts of a region unavailable at once: a count (`"2"`) or a percentage (`"25%"`).
    /// Default 10%.
    #[serde(default)]
    pub max_unavailable: Option<String>,
    /// Most failed hosts of a region before everything rolls back: a count or a percentage.
    /// Default 0: the first failure rolls back.
    #[serde(default)]
    pub max_failed: Option<String>,
    /// Bake of every wave in the first region (default 10 min).
    #[serde(default, with = "humantime_serde")]
    pub bake_first_region: Option<Duration>,
    /// Bake of every wave in the other regions (default 5 min).
    #[serde(default, with = "humantime_serde")]
    pub bake: Option<Duration>,
    /// More bakes the analysis judge may take when a wave's traffic cannot yet decide its
    /// gate, before the rollout is held for a human (default 2).
    #[serde(default)]
    pub bake_extensions: Option<u16>,
    /// Judge canary steps and batches against the baseline (default: on for canary).
    #[serde(default)]
    pub analysis: Option<bool>,
    /// Wait for an approver's promote after every wave.
    #[serde(default)]
    pub approval: bool,
    /// A host must activate (and be healthy) within this (default 2 min).
    #[serde(default, with = "humantime_serde")]
    pub activation_timeout: Option<Duration>,
    /// A host must stage within this of joining its wave (default 10 min).
    #[serde(default, with = "humantime_serde")]
    pub stage_timeout: Option<Duration>,
    /// A hotfix goes ahead of other queued deployments.
    #[serde(default)]
    pub hotfix: bool,
    /// Queue or refuse when another deployment of the service and environment is in progress.
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Why (shown in the audit log).
    #[serde(default)]
    pub comment: String,
}

/// A spec that cannot become a plan.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A field is invalid.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No enrolled host is in scope.
    #[error("no enrolled host of environment {environment:?} is in regions {regions:?}")]
    NoHosts {
        /// The environment.
        environment: String,
        /// The regions asked for.
        regions: Vec<String>,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid { field, reason: reason.into() }
}

/// Parses `"25%"` or `"3"`.
pub fn parse_limit(field: &'static str, text: &str) -> Result<Limit, SpecError> {
    let text = text.trim();
    if let Some(p) = text.strip_suffix('%') {
        let p: u32 = p.trim().parse().map_err(|_| invalid(field, format!("{text:?} is not N%")))?;
        if p > 100 {
            return Err(invalid(field, format!("{p}% is more than 100%")));
        }
        Ok(Limit::Percent(p))
    } else {
        let c: u32 =
            text.parse().map_err(|_| invalid(field, format!("{text:?} is not a count or N%")))?;
        Ok(Limit::Count(c))
    }
}

/// One enrolled host, as a plan needs it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Its number.
    pub number: u64,
    /// Its region.
    pub region: String,
    /// Its environment.
    pub environment: String,
    /// The release of the service it runs now.
    pub active: Option<ManifestId>,
}

impl DeploymentSpec {
    /// Checks the fields that need no state.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [
            ("service", &self.service),
            ("version", &self.version),
            ("environment", &self.environment),
        ] {
            if value.is_empty() || value.len() > 128 {
                return Err(invalid(field, "must be 1 to 128 characters"));
            }
        }
        if self.comment.len() > 4096 {
            return Err(invalid("comment", "longer than 4096 bytes"));
        }
        if self.regions.len() > 1000 {
            return Err(invalid("regions", "more than 1000"));
        }
        if self.canary_steps.len() > 100 {
            return Err(invalid("canary_steps", "more than 100"));
        }
        if !self.canary_steps.is_empty() {
            if self.strategy != StrategyKind::Canary {
                return Err(invalid("canary_steps", "only for strategy canary"));
            }
            if self.canary_steps.windows(2).any(|w| w[0] >= w[1]) {
                return Err(invalid("canary_steps", "must grow"));
            }
            if self.canary_steps.last() != Some(&100) || self.canary_steps[0] == 0 {
                return Err(invalid("canary_steps", "must be percentages from 1 ending at 100"));
            }
        }
        if let Some(m) = &self.max_unavailable {
            parse_limit("max_unavailable", m)?;
        }
        if let Some(m) = &self.max_failed {
            parse_limit("max_failed", m)?;
        }
        for (field, d) in
            [("activation_timeout", self.activation_timeout), ("stage_timeout", self.stage_timeout)]
        {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(invalid(field, "must be positive"));
            }
        }
        Ok(())
    }

    /// The rollout plan over `hosts` (every enrolled host; those of other environments and
    /// regions are left out).
    pub fn plan(
        &self,
        target: ManifestId,
        hosts: &[Candidate],
        seed: u64,
    ) -> Result<Plan, SpecError> {
        self.validate()?;
        let in_env: Vec<&Candidate> =
            hosts.iter().filter(|h| h.environment == self.environment).collect();
        let regions: Vec<String> = if self.regions.is_empty() {
            let mut r: Vec<String> = in_env.iter().map(|h| h.region.clone()).collect();
            r.sort();
            r.dedup();
            r
        } else {
            self.regions.clone()
        };
        let specs: Vec<HostSpec> = in_env
            .iter()
            .filter_map(|h| {
                let index = regions.iter().position(|r| *r == h.region)?;
                Some(HostSpec {
                    id: crate::rollout::HostId(h.number),
                    region: RegionIndex(u16::try_from(index).ok()?),
                    previous: h.active,
                })
            })
            .collect();
        if specs.is_empty() {
            return Err(SpecError::NoHosts {
                environment: self.environment.clone(),
                regions: regions.clone(),
            });
        }
        let analysis = self.analysis.unwrap_or(self.strategy == StrategyKind::Canary);
        let gates = Gates { analysis, approval: self.approval };
        let strategy = match self.strategy {
            StrategyKind::Rolling => Strategy::Rolling { gates },
            StrategyKind::BlueGreen => Strategy::BlueGreen { gates },
            StrategyKind::Canary => {
                let steps = if self.canary_steps.is_empty() {
                    vec![1, 5, 25, 50, 100]
                } else {
                    self.canary_steps.clone()
                };
                Strategy::Canary {
                    steps: steps
                        .iter()
                        .map(|&p| CanaryStep {
                            size: Limit::Percent(p),
                            // The last step has no baseline left in its region.
                            gates: Gates { analysis: analysis && p < 100, approval: self.approval },
                        })
                        .collect(),
                }
            }
        };
        let mut plan = Plan::new(self.service.clone(), target, regions, specs, strategy);
        plan.seed = seed;
        plan.stage_ahead = StageAhead::All;
        let defaults = Budget::default();
        plan.budget = Budget {
            max_unavailable: match &self.max_unavailable {
                Some(m) => parse_limit("max_unavailable", m)?,
                None => defaults.max_unavailable,
            },
            ..defaults
        };
        plan.health = HealthGate {
            max_failed: match &self.max_failed {
                Some(m) => parse_limit("max_failed", m)?,
                None => Limit::Count(0),
            },
        };
        let bake_defaults = Bake::default();
        plan.bake = Bake {
            first_region: self
                .bake_first_region
                .or(self.bake)
                .unwrap_or(bake_defaults.first_region),
            other_regions: self.bake.unwrap_or(bake_defaults.other_regions),
            extensions: self.bake_extensions.unwrap_or(bake_defaults.extensions),
        };
        let t = Timeouts::default();
        plan.timeouts = Timeouts {
            activation: self.activation_timeout.unwrap_or(t.activation),
            stage: self.stage_timeout.unwrap_or(t.stage),
            ..t
        };
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> DeploymentSpec {
        serde_json::from_str(json).expect("spec parses")
    }

    fn hosts() -> Vec<Candidate> {
        let mut out = Vec::new();
        for n in 0..6u64 {
            out.push(Candidate {
                number: n,
                region: if n % 2 == 0 { "eu".into() } else { "us".into() },
                environment: if n < 5 { "prod".into() } else { "dev".into() },
                active: None,
            });
        }
        out
    }

    #[test]
    fn a_minimal_spec_is_a_default_canary_over_the_environment() {
        let s = spec(r#"{"service":"web","version":"1.4.2","environment":"prod"}"#);
        let plan = s.plan(ManifestId([1; 32]), &hosts(), 7).expect("plan");
        assert_eq!(plan.regions, vec!["eu".to_owned(), "us".to_owned()]);
        assert_eq!(plan.hosts.len(), 5);
        let Strategy::Canary { steps } = &plan.strategy else { panic!("canary") };
        assert_eq!(steps.len(), 5);
        assert!(steps[0].gates.analysis && !steps[4].gates.analysis);
        assert_eq!(plan.health.max_failed, Limit::Count(0));
    }

    #[test]
    fn regions_choose_and_order_the_hosts() {
        let s = spec(
            r#"{"service":"web","version":"1","environment":"prod","strategy":"rolling",
                "regions":["us"],"max_unavailable":"25%","bake":"30s"}"#,
        );
        let plan = s.plan(ManifestId([1; 32]), &hosts(), 0).expect("plan");
        assert_eq!(plan.hosts.len(), 2);
        assert_eq!(plan.budget.max_unavailable, Limit::Percent(25));
        assert_eq!(plan.bake.first_region, Duration::from_secs(30));
    }

    #[test]
    fn bad_specs_are_refused_with_the_field() {
        let bad = [
            (r#"{"service":"","version":"1","environment":"prod"}"#, "service"),
            (
                r#"{"service":"w","version":"1","environment":"prod","canary_steps":[5,1,100]}"#,
                "canary_steps",
            ),
            (
                r#"{"service":"w","version":"1","environment":"prod","max_unavailable":"150%"}"#,
                "max_unavailable",
            ),
        ];
        for (json, field) in bad {
            match spec(json).validate() {
                Err(SpecError::Invalid { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        let unknown: Result<DeploymentSpec, _> =
            serde_json::from_str(r#"{"service":"w","version":"1","environment":"p","nope":1}"#);
        assert!(unknown.is_err());
        let none = spec(r#"{"service":"w","version":"1","environment":"staging"}"#);
        assert!(matches!(
            none.plan(ManifestId([1; 32]), &hosts(), 0),
            Err(SpecError::NoHosts { .. })
        ));
    }
}
