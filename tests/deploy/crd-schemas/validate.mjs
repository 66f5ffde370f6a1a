// Validate custom resources against their CRD schemas (kubernetes-models, generated from the projects' CRDs).
// Input: a JSON list of objects on stdin. Output: one line per object; exit 1 when any is invalid or unknown.
import { readFileSync } from "node:fs";
import { AnalysisTemplate, Rollout } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1";
import { Certificate, Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "argoproj.io/v1alpha1/AnalysisTemplate": AnalysisTemplate,
  "argoproj.io/v1alpha1/Rollout": Rollout,
  "cert-manager.io/v1/Certificate": Certificate,
  "cert-manager.io/v1/Issuer": Issuer,
  "gateway.networking.k8s.io/v1/HTTPRoute": HTTPRoute,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};
const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const Model = models[key];
  if (!Model) {
    failed++;
    console.log(`UNKNOWN ${key} ${obj.metadata?.name}: no schema here`);
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`OK ${key} ${obj.metadata.name}`);
  } catch (e) {
    failed++;
    console.log(`INVALID ${key} ${obj.metadata?.name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
