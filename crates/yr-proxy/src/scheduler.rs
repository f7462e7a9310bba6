//! The local scheduler: this node's resources, the queue of requests waiting for them, and the
//! CPU that blocked instances lend back.
//!
//! It is the only owner of the node's resource accounting. A request that does not fit waits in
//! the queue and is granted when resources are released (no polling). An instance blocked in
//! `get` or `wait` lends its CPU back, and takes it again when it resumes, even if that briefly
//! oversubscribes the node: nested tasks then finish instead of waiting for each other. Every
//! change of the free resources is reported through `changed` (the master's view), and every
//! change of the set of clients whose requests wait through `pressure` (the other clients that
//! hold idle stateless instances then release them at once).

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use yr_proto::v1 as pb;

use crate::resources::{Amount, LocalResources};

/// A request waiting in the queue.
struct Waiter {
    request: Amount,
    /// The bus client the request is for (0: none on this node).
    owner: u64,
    grant: oneshot::Sender<()>,
}

struct State {
    resources: LocalResources,
    /// Waiting requests, in arrival order.
    queue: BTreeMap<u64, Waiter>,
    next_ticket: u64,
    /// CPU taken back by resumed instances beyond what was free (oversubscription), paid back
    /// first when CPU is released.
    owed_cpu: u64,
    /// Waiting requests of each owner.
    waiting_owners: HashMap<u64, usize>,
    /// The owners with waiting requests changed since `pressure` was last told.
    owners_changed: bool,
}

impl State {
    fn enqueue(&mut self, id: u64, waiter: Waiter) {
        let count = self.waiting_owners.entry(waiter.owner).or_insert(0);
        *count += 1;
        self.owners_changed |= *count == 1;
        self.queue.insert(id, waiter);
    }

    fn dequeue(&mut self, id: u64) -> Option<Waiter> {
        let waiter = self.queue.remove(&id)?;
        if let Some(count) = self.waiting_owners.get_mut(&waiter.owner) {
            *count -= 1;
            if *count == 0 {
                self.waiting_owners.remove(&waiter.owner);
                self.owners_changed = true;
            }
        }
        Some(waiter)
    }

    /// The owners with waiting requests, if they changed since `pressure` was last told.
    fn pressure_changed(&mut self) -> Option<Vec<u64>> {
        if !std::mem::take(&mut self.owners_changed) {
            return None;
        }
        Some(self.waiting_owners.keys().copied().collect())
    }
}

/// A place in the queue. Resolves when the request is granted.
pub struct Ticket {
    /// Identifies the request to [`Scheduler::withdraw`].
    pub id: u64,
    /// Resolves when the resources are reserved for the request.
    pub granted: oneshot::Receiver<()>,
}

/// The local scheduler.
pub struct Scheduler {
    state: Mutex<State>,
    changed: Box<dyn Fn(pb::ResourceDelta) + Send + Sync>,
    pressure: Box<dyn Fn(Vec<u64>) + Send + Sync>,
}

impl Scheduler {
    /// A scheduler over `capacity`, telling `changed` every change of the free resources and
    /// `pressure` the owners whose requests wait, each time that set changes.
    pub fn new(
        capacity: Amount,
        changed: Box<dyn Fn(pb::ResourceDelta) + Send + Sync>,
        pressure: Box<dyn Fn(Vec<u64>) + Send + Sync>,
    ) -> Self {
        Scheduler {
            state: Mutex::new(State {
                resources: LocalResources::new(capacity),
                queue: BTreeMap::new(),
                next_ticket: 1,
                owed_cpu: 0,
                waiting_owners: HashMap::new(),
                owners_changed: false,
            }),
            changed,
            pressure,
        }
    }

    /// The owners whose requests wait now.
    pub fn waiting_owners(&self) -> Vec<u64> {
        self.state.lock().waiting_owners.keys().copied().collect()
    }

    /// Capacity and free resources now.
    pub fn resources(&self) -> LocalResources {
        self.state.lock().resources.clone()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Reserve `request` for bus client `owner` (0: none): at once if it fits (the ticket is
    /// already granted), else when resources are released.
    pub fn request(&self, request: &Amount, owner: u64) -> Ticket {
        let (grant, granted) = oneshot::channel();
        let mut state = self.state.lock();
        let id = state.next_ticket;
        state.next_ticket += 1;
        if state.resources.try_allocate(request) {
            let _ = grant.send(());
            drop(state);
            (self.changed)(request.delta(true));
        } else {
            state.enqueue(
                id,
                Waiter {
                    request: request.clone(),
                    owner,
                    grant,
                },
            );
            let changed = state.pressure_changed();
            drop(state);
            if let Some(owners) = changed {
                (self.pressure)(owners);
            }
        }
        Ticket { id, granted }
    }

    /// Give up ticket `id` for `request`: it leaves the queue, or, if it was granted already,
    /// its resources are released.
    pub fn withdraw(&self, id: u64, request: &Amount) {
        let (waiting, changed) = {
            let mut state = self.state.lock();
            let waiting = state.dequeue(id).is_some();
            (waiting, state.pressure_changed())
        };
        if let Some(owners) = changed {
            (self.pressure)(owners);
        }
        if !waiting {
            self.release(request);
        }
    }

    /// Give `amount` back and grant the waiting requests that now fit, in order.
    pub fn release(&self, amount: &Amount) {
        let mut amount = amount.clone();
        let mut granted = Vec::new();
        let pressure = {
            let mut state = self.state.lock();
            let paid = state.owed_cpu.min(amount.cpu);
            state.owed_cpu -= paid;
            amount.cpu -= paid;
            state.resources.release(&amount);
            let ids: Vec<u64> = state.queue.keys().copied().collect();
            for id in ids {
                let fits = state
                    .queue
                    .get(&id)
                    .is_some_and(|w| w.request.fits_in(&state.resources.allocatable));
                if !fits {
                    continue;
                }
                if let Some(waiter) = state.dequeue(id) {
                    state.resources.try_allocate(&waiter.request);
                    granted.push(waiter);
                }
            }
            state.pressure_changed()
        };
        if let Some(owners) = pressure {
            (self.pressure)(owners);
        }
        (self.changed)(amount.delta(false));
        for waiter in granted {
            (self.changed)(waiter.request.delta(true));
            if waiter.grant.send(()).is_err() {
                // Its asker gave up in between without withdrawing: nobody holds it.
                self.release(&waiter.request);
            }
        }
    }

    /// An instance holding `cpu` millicores blocked: lend them to the waiting requests.
    pub fn lend_cpu(&self, cpu: u64) {
        self.release(&Amount {
            cpu,
            ..Amount::default()
        });
    }

    /// An instance that lent `cpu` millicores resumed: take them back, even beyond what is
    /// free (the excess is owed and paid back by the next releases).
    pub fn reclaim_cpu(&self, cpu: u64) {
        let taken = {
            let mut state = self.state.lock();
            let free = state.resources.allocatable.cpu;
            let taken = free.min(cpu);
            state.resources.allocatable.cpu -= taken;
            state.owed_cpu += cpu - taken;
            taken
        };
        (self.changed)(
            Amount {
                cpu: taken,
                ..Amount::default()
            }
            .delta(true),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn cpu(millicores: u64) -> Amount {
        Amount {
            cpu: millicores,
            memory: 0,
            custom: Default::default(),
        }
    }

    fn scheduler(capacity: u64) -> (Scheduler, Arc<Mutex<i64>>) {
        let (scheduler, reported, _) = scheduler_with_pressure(capacity);
        (scheduler, reported)
    }

    /// What a scheduler told `pressure`, in order.
    type Told = Arc<Mutex<Vec<Vec<u64>>>>;

    /// A scheduler, the free CPU it reported, and what it told `pressure`.
    fn scheduler_with_pressure(capacity: u64) -> (Scheduler, Arc<Mutex<i64>>, Told) {
        let reported = Arc::new(Mutex::new(capacity as i64));
        let sink = reported.clone();
        let told = Arc::new(Mutex::new(Vec::new()));
        let pressure = told.clone();
        let scheduler = Scheduler::new(
            cpu(capacity),
            Box::new(move |delta| *sink.lock() += delta.cpu_millicores),
            Box::new(move |mut owners: Vec<u64>| {
                owners.sort();
                pressure.lock().push(owners)
            }),
        );
        (scheduler, reported, told)
    }

    #[test]
    fn pressure_is_told_the_owners_whose_requests_wait_when_they_change() {
        let (scheduler, _, told) = scheduler_with_pressure(1000);
        let _all = scheduler.request(&cpu(1000), 7);
        assert!(told.lock().is_empty(), "nothing waits");
        let first = scheduler.request(&cpu(500), 1);
        let _second = scheduler.request(&cpu(500), 1);
        assert_eq!(
            *told.lock(),
            vec![vec![1]],
            "told once, when client 1 starts waiting"
        );
        let _third = scheduler.request(&cpu(600), 2);
        assert_eq!(told.lock().last(), Some(&vec![1, 2]));
        assert_eq!(scheduler.waiting_owners().len(), 2);
        scheduler.withdraw(first.id, &cpu(500));
        assert_eq!(told.lock().len(), 2, "client 1 still waits");
        // 500 free: client 1's request fits, client 2's does not.
        scheduler.release(&cpu(500));
        assert_eq!(told.lock().last(), Some(&vec![2]));
        scheduler.release(&cpu(1000));
        assert_eq!(told.lock().last(), Some(&Vec::new()), "none waits");
        assert!(scheduler.waiting_owners().is_empty());
    }

    #[test]
    fn a_request_that_fits_is_granted_at_once() {
        let (scheduler, reported) = scheduler(1000);
        let mut ticket = scheduler.request(&cpu(600), 0);
        assert!(ticket.granted.try_recv().is_ok());
        assert_eq!(scheduler.resources().allocatable.cpu, 400);
        assert_eq!(*reported.lock(), 400, "the master's view follows");
    }

    #[test]
    fn a_waiting_request_is_woken_by_a_release() {
        let (scheduler, reported) = scheduler(1000);
        let mut first = scheduler.request(&cpu(1000), 0);
        assert!(first.granted.try_recv().is_ok());
        let mut second = scheduler.request(&cpu(500), 0);
        assert!(second.granted.try_recv().is_err(), "waits");
        assert_eq!(scheduler.waiting(), 1);
        scheduler.release(&cpu(1000));
        assert!(second.granted.try_recv().is_ok(), "granted by the release");
        assert_eq!(scheduler.resources().allocatable.cpu, 500);
        assert_eq!(*reported.lock(), 500);
    }

    #[test]
    fn a_large_request_does_not_block_smaller_ones_behind_it() {
        let (scheduler, _) = scheduler(1000);
        let _all = scheduler.request(&cpu(1000), 0);
        let mut large = scheduler.request(&cpu(900), 0);
        let mut small = scheduler.request(&cpu(200), 0);
        scheduler.release(&cpu(300));
        assert!(large.granted.try_recv().is_err());
        assert!(small.granted.try_recv().is_ok());
    }

    #[test]
    fn withdrawing_leaves_the_queue_or_releases_what_was_granted() {
        let (scheduler, _) = scheduler(1000);
        let granted = scheduler.request(&cpu(1000), 0);
        let waiting = scheduler.request(&cpu(1000), 0);
        scheduler.withdraw(waiting.id, &cpu(1000));
        assert_eq!(scheduler.waiting(), 0);
        assert_eq!(scheduler.resources().allocatable.cpu, 0);
        scheduler.withdraw(granted.id, &cpu(1000));
        assert_eq!(scheduler.resources().allocatable.cpu, 1000);
    }

    #[test]
    fn a_dropped_asker_does_not_leak_its_grant() {
        let (scheduler, _) = scheduler(1000);
        let _all = scheduler.request(&cpu(1000), 0);
        drop(scheduler.request(&cpu(400), 0));
        scheduler.release(&cpu(1000));
        assert_eq!(scheduler.resources().allocatable.cpu, 1000);
    }

    #[test]
    fn blocked_instances_lend_their_cpu_and_take_it_back_even_beyond_capacity() {
        let (scheduler, reported) = scheduler(1000);
        let _parent = scheduler.request(&cpu(1000), 0);
        let mut child = scheduler.request(&cpu(1000), 0);
        assert!(child.granted.try_recv().is_err());
        scheduler.lend_cpu(1000);
        assert!(
            child.granted.try_recv().is_ok(),
            "the parent's CPU runs the child"
        );
        scheduler.reclaim_cpu(1000);
        assert_eq!(scheduler.resources().allocatable.cpu, 0);
        // The child ends: its release pays back what the parent took beyond capacity.
        scheduler.release(&cpu(1000));
        assert_eq!(scheduler.resources().allocatable.cpu, 0);
        scheduler.release(&cpu(1000));
        assert_eq!(scheduler.resources().allocatable.cpu, 1000);
        assert_eq!(*reported.lock(), 1000);
    }
}
