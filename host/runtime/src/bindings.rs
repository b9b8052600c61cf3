//! Rust bindings of the `outpost:handler@0.1.0` world, generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../../wit/outpost-handler-0.1.0",
    world: "update-handler",
    imports: { default: async | trappable },
    exports: { default: async },
});
