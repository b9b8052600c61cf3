//! The handler interface's exports, found and type-checked once when a component is
//! loaded, so that each call only fetches its function by index.
//!
//! The generated bindings type-check all eight exports at every instantiation (a twentieth
//! of a small guest's call, measured by handler-bench); the types of a component's exports
//! are the same in each of its instances, so once is enough. It also moves a mistyped
//! export from an error at every call to an error at install.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    ComponentExportIndex, ComponentNamedList, Instance, InstancePre, Lift, Lower, TypedFunc,
};
use wasmtime::error::Context as _;
use wasmtime::{AsContextMut, Store};

use crate::host::HostState;
use crate::{Device, DeviceReport, HandlerInfo, Outcome, ReportVerdict, Step, Update};

/// The exported interface every handler implements.
pub(crate) const INTERFACE: &str = "outpost:handler/handler@0.1.0";

/// `describe`'s parameters and results.
type DescribeParams = ();
type DescribeResults = (HandlerInfo,);
/// A step's parameters and results.
type StepParams<'a> = (&'a Device, &'a Update);
type StepResults = (Outcome,);
/// `interpret-report`'s parameters and results.
type ReportParams<'a> = (&'a Device, &'a Update, &'a DeviceReport);
type ReportResults = (ReportVerdict,);

/// Where each export of [`INTERFACE`] is in one component. Only valid with instances of
/// the component it was made from, which [`Handler`](crate::Handler) guarantees by
/// keeping both together.
#[derive(Clone)]
pub(crate) struct Exports {
    describe: ComponentExportIndex,
    steps: [ComponentExportIndex; 6],
    interpret_report: ComponentExportIndex,
}

const STEPS: [Step; 6] = [
    Step::IsInstalled,
    Step::Download,
    Step::Install,
    Step::Apply,
    Step::Cancel,
    Step::Rollback,
];

impl Exports {
    /// Finds every export and checks its type against the WIT.
    pub(crate) fn new(pre: &InstancePre<HostState>) -> wasmtime::Result<Self> {
        let component = pre.component();
        let types = pre.instance_type();
        let (_, interface) = component
            .get_export(None, INTERFACE)
            .with_context(|| format!("the component does not export `{INTERFACE}`"))?;
        let func = |name: &str| {
            let (item, index) = component
                .get_export(Some(&interface), name)
                .with_context(|| format!("`{INTERFACE}` has no export `{name}`"))?;
            match item {
                ComponentItem::ComponentFunc(func) => Ok((func, index)),
                _ => wasmtime::bail!("`{name}` in `{INTERFACE}` is not a function"),
            }
        };
        let context = |name: &str| format!("the export `{name}` does not have the WIT's type");

        // Every name first, so that a missing one is named before a mistyped one.
        let (describe_ty, describe) = func("describe")?;
        let steps = STEPS
            .iter()
            .map(|step| func(step.name()))
            .collect::<wasmtime::Result<Vec<_>>>()?;
        let (report_ty, interpret_report) = func("interpret-report")?;

        describe_ty
            .typecheck::<DescribeParams, DescribeResults>(&types)
            .with_context(|| context("describe"))?;
        for (step, (ty, _)) in STEPS.iter().zip(&steps) {
            ty.typecheck::<StepParams<'_>, StepResults>(&types)
                .with_context(|| context(step.name()))?;
        }
        report_ty
            .typecheck::<ReportParams<'_>, ReportResults>(&types)
            .with_context(|| context("interpret-report"))?;
        let steps: Vec<ComponentExportIndex> = steps.into_iter().map(|(_, index)| index).collect();
        Ok(Self {
            describe,
            steps: steps.try_into().expect("one index per step"),
            interpret_report,
        })
    }

    /// Calls `describe` in `instance`.
    pub(crate) async fn describe(
        &self,
        store: &mut Store<HostState>,
        instance: Instance,
    ) -> wasmtime::Result<HandlerInfo> {
        let (info,) =
            call::<DescribeParams, DescribeResults>(store, instance, &self.describe, ()).await?;
        Ok(info)
    }

    /// Calls `step`'s export in `instance`.
    pub(crate) async fn step(
        &self,
        store: &mut Store<HostState>,
        instance: Instance,
        step: Step,
        device: &Device,
        update: &Update,
    ) -> wasmtime::Result<Outcome> {
        let index = &self.steps[STEPS.iter().position(|s| *s == step).expect("every step")];
        let (outcome,) =
            call::<StepParams<'_>, StepResults>(store, instance, index, (device, update)).await?;
        Ok(outcome)
    }

    /// Calls `interpret-report` in `instance`.
    pub(crate) async fn interpret_report(
        &self,
        store: &mut Store<HostState>,
        instance: Instance,
        device: &Device,
        update: &Update,
        report: &DeviceReport,
    ) -> wasmtime::Result<ReportVerdict> {
        let (verdict,) = call::<ReportParams<'_>, ReportResults>(
            store,
            instance,
            &self.interpret_report,
            (device, update, report),
        )
        .await?;
        Ok(verdict)
    }
}

/// Calls the export at `index` of `instance` with `params`.
///
/// Only this module calls it, each time with an index [`Exports::new`] type-checked
/// against exactly `P` and `R`. An index only finds functions in instances of the
/// component it came from (wasmtime compares the component's id; any other instance
/// answers `None`, an error here), and every instance of a component has its types.
async fn call<P, R>(
    store: &mut Store<HostState>,
    instance: Instance,
    index: &ComponentExportIndex,
    params: P,
) -> wasmtime::Result<R>
where
    P: ComponentNamedList + Lower + Send + Sync,
    R: ComponentNamedList + Lift + Send + Sync + 'static,
{
    let func = instance
        .get_func(store.as_context_mut(), index)
        .context("the handler's export is missing from its own instance")?;
    // SAFETY: `func` is this index's export of its own component, which `Exports::new`
    // type-checked against `P` and `R` (see above).
    #[allow(unsafe_code)]
    let typed = unsafe { TypedFunc::<P, R>::new_unchecked(func) };
    typed.call_async(store, params).await
}
