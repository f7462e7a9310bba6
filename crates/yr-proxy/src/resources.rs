//! This node's resources: capacity, what instances hold, and whether a request fits.

use std::collections::BTreeMap;

use yr_common::InvokeOptions;
use yr_proto::v1 as pb;

/// A resource amount.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Amount {
    /// Millicores.
    pub cpu: u64,
    /// MB.
    pub memory: u64,
    /// Custom resources.
    pub custom: BTreeMap<String, f64>,
}

impl Amount {
    /// What an instance with `options` asks for.
    pub fn of(options: &InvokeOptions) -> Amount {
        Amount {
            cpu: u64::from(options.cpu),
            memory: u64::from(options.memory),
            custom: options.custom_resources.clone(),
        }
    }

    /// Whether `self` fits in `other`.
    pub fn fits_in(&self, other: &Amount) -> bool {
        self.cpu <= other.cpu
            && self.memory <= other.memory
            && self.custom.iter().all(|(name, amount)| {
                *amount <= 0.0 || other.custom.get(name).is_some_and(|have| have >= amount)
            })
    }

    /// For the wire.
    pub fn to_proto(&self) -> pb::Resources {
        pb::Resources {
            cpu_millicores: self.cpu,
            memory_mb: self.memory,
            custom: self.custom.clone().into_iter().collect(),
        }
    }

    /// `self` as a change of allocatable resources: negative when `taken`.
    pub fn delta(&self, taken: bool) -> pb::ResourceDelta {
        let sign = if taken { -1.0 } else { 1.0 };
        pb::ResourceDelta {
            cpu_millicores: if taken {
                -(self.cpu as i64)
            } else {
                self.cpu as i64
            },
            memory_mb: if taken {
                -(self.memory as i64)
            } else {
                self.memory as i64
            },
            custom: self
                .custom
                .iter()
                .map(|(k, v)| (k.clone(), sign * v))
                .collect(),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} millicores, {} MB", self.cpu, self.memory)?;
        for (name, amount) in &self.custom {
            write!(f, ", {amount} {name}")?;
        }
        Ok(())
    }
}

/// Capacity and what is free.
#[derive(Clone, Debug)]
pub struct LocalResources {
    /// Everything the node offers.
    pub capacity: Amount,
    /// What is free now.
    pub allocatable: Amount,
}

impl LocalResources {
    /// A node with `capacity`, all free.
    pub fn new(capacity: Amount) -> LocalResources {
        LocalResources {
            allocatable: capacity.clone(),
            capacity,
        }
    }

    /// Take `request` if it fits now.
    pub fn try_allocate(&mut self, request: &Amount) -> bool {
        if !request.fits_in(&self.allocatable) {
            return false;
        }
        self.allocatable.cpu -= request.cpu;
        self.allocatable.memory -= request.memory;
        for (name, amount) in &request.custom {
            if let Some(have) = self.allocatable.custom.get_mut(name) {
                *have -= amount;
            }
        }
        true
    }

    /// Give `request` back.
    pub fn release(&mut self, request: &Amount) {
        self.allocatable.cpu = (self.allocatable.cpu + request.cpu).min(self.capacity.cpu);
        self.allocatable.memory =
            (self.allocatable.memory + request.memory).min(self.capacity.memory);
        for (name, amount) in &request.custom {
            if let Some(have) = self.allocatable.custom.get_mut(name) {
                let cap = self
                    .capacity
                    .custom
                    .get(name)
                    .copied()
                    .unwrap_or(*have + amount);
                *have = (*have + amount).min(cap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(cpu: u64, memory: u64) -> Amount {
        Amount {
            cpu,
            memory,
            custom: BTreeMap::new(),
        }
    }

    #[test]
    fn allocation_and_release_round_trip() {
        let mut resources = LocalResources::new(amount(2000, 4096));
        assert!(resources.try_allocate(&amount(1500, 1000)));
        assert!(!resources.try_allocate(&amount(1000, 1000)));
        resources.release(&amount(1500, 1000));
        assert_eq!(resources.allocatable, amount(2000, 4096));
    }

    #[test]
    fn custom_resources_must_exist() {
        let mut request = amount(100, 100);
        request.custom.insert("gpu".into(), 1.0);
        assert!(!request.fits_in(&amount(1000, 1000)));
        let mut node = amount(1000, 1000);
        node.custom.insert("gpu".into(), 2.0);
        assert!(request.fits_in(&node));
    }
}
