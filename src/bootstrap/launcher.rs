//! Rank and job size from the launcher's environment (Slurm, Open MPI, PMI/Hydra).

use thiserror::Error;

/// The launcher a [`LaunchInfo`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Launcher {
    /// Open MPI's `mpirun`/`prterun` (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`).
    OpenMpi,
    /// A PMI launcher such as MPICH's Hydra (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`).
    Slurm,
}

/// This process's place in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchInfo {
    /// Rank, `0..size`.
    pub rank: u32,
    /// Number of processes in the job.
    pub size: u32,
    /// Where the values came from.
    pub launcher: Launcher,
}

/// A launcher variable is present but unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A variable is not a decimal `u32`.
    #[error("{var}={value:?} is not a non-negative integer")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// Only one of the rank and size variables is set.
    #[error("{present} is set but {missing} is not")]
    Incomplete {
        /// The variable found.
        present: &'static str,
        /// The variable missing.
        missing: &'static str,
    },
    /// The rank is not below the size, or the size is zero.
    #[error("rank {rank} is out of range for a job of {size} from {var}")]
    OutOfRange {
        /// The rank.
        rank: u32,
        /// The size.
        size: u32,
        /// The rank variable.
        var: &'static str,
    },
    /// The job size is above [`LaunchInfo::MAX_SIZE`].
    #[error("{var}={size} is above the largest job size supported, {max} ranks")]
    TooLarge {
        /// The size variable.
        var: &'static str,
        /// Its value.
        size: u32,
        /// [`LaunchInfo::MAX_SIZE`].
        max: u32,
    },
    /// A variable's value is not valid UTF-8.
    #[error("{var} is not valid UTF-8")]
    NotUnicode {
        /// The variable.
        var: &'static str,
    },
}

const SOURCES: [(Launcher, &str, &str); 3] = [
    (
        Launcher::OpenMpi,
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
    ),
    (Launcher::Pmi, "PMI_RANK", "PMI_SIZE"),
    (Launcher::Slurm, "SLURM_PROCID", "SLURM_NTASKS"),
];

impl LaunchInfo {
    /// The largest job size accepted: 2^20 ranks. A full mesh holds a connection to every other
    /// rank, so jobs anywhere near this are far beyond what one process can connect to; a larger
    /// value is taken for a malformed variable.
    pub const MAX_SIZE: u32 = 1 << 20;

    /// Reads the process environment. The MPI launchers are tried before Slurm, because
    /// `mpirun` inside a Slurm allocation sees Slurm's variables of the allocation, not of the job.
    ///
    /// # Errors
    /// A variable of the first launcher found is malformed (not UTF-8 included) or
    /// inconsistent, or its size is above [`LaunchInfo::MAX_SIZE`].
    pub fn from_env() -> Result<Option<Self>, LaunchError> {
        Self::from_lookup(|var| match std::env::var(var) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(LaunchError::NotUnicode { var }),
        })
    }

    /// As [`Self::from_env`], reading variables through `get`.
    ///
    /// # Errors
    /// As [`Self::from_env`].
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, LaunchError> {
        Self::from_lookup(|var| Ok(get(var)))
    }

    fn from_lookup(
        get: impl Fn(&'static str) -> Result<Option<String>, LaunchError>,
    ) -> Result<Option<Self>, LaunchError> {
        let num = |var: &'static str, value: String| {
            value
                .trim()
                .parse::<u32>()
                .map_err(|_| LaunchError::NotANumber { var, value })
        };
        for (launcher, rank_var, size_var) in SOURCES {
            match (get(rank_var)?, get(size_var)?) {
                (None, None) => continue,
                (Some(_), None) => {
                    return Err(LaunchError::Incomplete {
                        present: rank_var,
                        missing: size_var,
                    });
                }
                (None, Some(_)) => {
                    return Err(LaunchError::Incomplete {
                        present: size_var,
                        missing: rank_var,
                    });
                }
                (Some(r), Some(s)) => {
                    let rank = num(rank_var, r)?;
                    let size = num(size_var, s)?;
                    if size > Self::MAX_SIZE {
                        return Err(LaunchError::TooLarge {
                            var: size_var,
                            size,
                            max: Self::MAX_SIZE,
                        });
                    }
                    if rank >= size {
                        return Err(LaunchError::OutOfRange {
                            rank,
                            size,
                            var: rank_var,
                        });
                    }
                    return Ok(Some(Self {
                        rank,
                        size,
                        launcher,
                    }));
                }
            }
        }
        Ok(None)
    }
}

/// Variables that name the job (or job step) a process belongs to, most specific first per
/// launcher: two concurrent jobs on one host get different values, the ranks of one job the same.
const JOB_VARS: [&[&str]; 4] = [
    &["RSMSG_JOB"],
    // Open MPI 5 (PRRTE/PMIx) and 4 (ORTE).
    &["PMIX_NAMESPACE"],
    &["OMPI_MCA_ess_base_jobid"],
    &["SLURM_JOB_ID", "SLURM_STEP_ID"],
];

/// Every variable [`job_name_from_vars`] may read.
pub(crate) fn job_name_vars() -> impl Iterator<Item = &'static str> {
    JOB_VARS.into_iter().flatten().copied()
}

/// A name for this process's job, from `RSMSG_JOB` or the launcher (`PMIX_NAMESPACE`,
/// `OMPI_MCA_ess_base_jobid`, `SLURM_JOB_ID` + `SLURM_STEP_ID`), reduced to the characters
/// endpoint names allow (`[A-Za-z0-9._-]`, other bytes become `_`) and to at most `max` bytes
/// (the end is kept: job ids differ in their tail). `None` when no such variable is set.
pub fn job_name_from_vars(get: impl Fn(&str) -> Option<String>, max: usize) -> Option<String> {
    for vars in JOB_VARS {
        let parts: Vec<String> = vars
            .iter()
            .filter_map(|v| get(v).filter(|s| !s.trim().is_empty()))
            .collect();
        if parts.is_empty() {
            continue;
        }
        let joined = parts.join(".");
        let clean: String = joined
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let skip = clean.len().saturating_sub(max);
        let name = clean[skip..].trim_start_matches('.').to_string();
        if name.is_empty() {
            continue;
        }
        return Some(name);
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_names() {
        let get = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(job_name_from_vars(get(&[]), 32), None);
        assert_eq!(
            job_name_from_vars(get(&[("SLURM_JOB_ID", "77"), ("SLURM_STEP_ID", "3")]), 32),
            Some("77.3".into())
        );
        assert_eq!(
            job_name_from_vars(
                get(&[
                    ("PMIX_NAMESPACE", "prterun-host-123@1"),
                    ("SLURM_JOB_ID", "5")
                ]),
                32
            ),
            Some("prterun-host-123_1".into())
        );
        assert_eq!(
            job_name_from_vars(get(&[("RSMSG_JOB", "abcdefgh"), ("SLURM_JOB_ID", "5")]), 4),
            Some("efgh".into())
        );
        assert_eq!(job_name_from_vars(get(&[("RSMSG_JOB", "  ")]), 4), None);
    }

    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Option<LaunchInfo>, LaunchError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        LaunchInfo::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn launchers() {
        assert_eq!(with(&[]), Ok(None));
        let i = with(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8")])
            .unwrap()
            .unwrap();
        assert_eq!((i.rank, i.size, i.launcher), (3, 8, Launcher::Slurm));
        let i = with(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "6"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((i.rank, i.size, i.launcher), (5, 6, Launcher::OpenMpi));
        let i = with(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")])
            .unwrap()
            .unwrap();
        assert_eq!(i.launcher, Launcher::Pmi);
        assert!(matches!(
            with(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")]),
            Err(LaunchError::OutOfRange { .. })
        ));
        assert!(matches!(
            with(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")]),
            Err(LaunchError::NotANumber { .. })
        ));
        assert!(matches!(
            with(&[("PMI_RANK", "-1"), ("PMI_SIZE", "2")]),
            Err(LaunchError::NotANumber { .. })
        ));
        assert!(matches!(
            with(&[("SLURM_NTASKS", "2")]),
            Err(LaunchError::Incomplete { .. })
        ));
    }

    #[test]
    fn job_sizes_above_the_maximum_are_refused() {
        let max = LaunchInfo::MAX_SIZE.to_string();
        let i = with(&[("PMI_RANK", "0"), ("PMI_SIZE", &max)])
            .unwrap()
            .unwrap();
        assert_eq!(i.size, LaunchInfo::MAX_SIZE);
        let over = (LaunchInfo::MAX_SIZE + 1).to_string();
        for size in [over.as_str(), "4294967295"] {
            let e = with(&[("PMI_RANK", "0"), ("PMI_SIZE", size)]).unwrap_err();
            assert_eq!(
                e,
                LaunchError::TooLarge {
                    var: "PMI_SIZE",
                    size: size.parse().unwrap(),
                    max: LaunchInfo::MAX_SIZE
                }
            );
            assert!(e.to_string().contains("PMI_SIZE"), "{e}");
        }
        let e = with(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4294967295")]).unwrap_err();
        assert!(
            matches!(
                e,
                LaunchError::TooLarge {
                    var: "SLURM_NTASKS",
                    ..
                }
            ),
            "{e}"
        );
    }
}
