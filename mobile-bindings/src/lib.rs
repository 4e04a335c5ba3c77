//! The mobile layer of Fieldchart: the sync driver and, later, the uniffi bindings.
