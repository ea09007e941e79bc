"""The experiment's stages: ``finetune``, ``sample``, ``classify`` and ``reduce``, one module each. Each is a pure
function of (spec, upstream outputs in the store) -> outputs in the store. Import the submodule you need: this
package imports none of them, so ``import alignfake.stages.reduce`` never pulls in torch."""
