"""The cluster side of the stages: a Kubeflow Trainer TrainJob for multi-node training (:mod:`.trainjob`), the
InferenceService that serves the final model (:mod:`.deploy`), and the Kubernetes client they share (:mod:`.k8s`).
Objects are built by pure functions (tested against the published schemas) and applied by small loops that wait
for the controller's verdict."""
