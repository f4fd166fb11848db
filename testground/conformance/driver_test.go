package driver

// The driver: the suite's tests through its public API (suite.NewConformanceTestSuite, Setup,
// Run) against the cluster in KUBECONFIG, with GatewayClass $CONFORMANCE_GATEWAY_CLASS.
// scripts/conformance builds it with `go test -c` and runs it under test2json.
//
//   KUBECONFIG                     the cluster (required)
//   CONFORMANCE_OUT                directory for tests.json (the plan per test; default .)
//   CONFORMANCE_GATEWAY_CLASS      default picotun; created when missing
//   CONFORMANCE_CONTROLLER_NAME    its controllerName (default tunnels.pico.sh/gateway-controller)
//   CONFORMANCE_NAMESPACE_LABEL    key=value put on every namespace the suite makes (default
//                                  picotun.dev/conformance=true; the controller's --namespace-selector)
//   CONFORMANCE_TIMEOUT            cap on each of the suite's waits (default 30s; the suite's own
//                                  defaults are 60-300s, made for clouds provisioning load balancers)

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/wait"
	clientset "k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/config"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/apis/v1alpha2"
	"sigs.k8s.io/gateway-api/apis/v1alpha3"
	"sigs.k8s.io/gateway-api/apis/v1beta1"
	xv1alpha1 "sigs.k8s.io/gateway-api/apisx/v1alpha1"
	upstream "sigs.k8s.io/gateway-api/conformance"
	"sigs.k8s.io/gateway-api/conformance/tests"
	conformanceconfig "sigs.k8s.io/gateway-api/conformance/utils/config"
	"sigs.k8s.io/gateway-api/conformance/utils/roundtripper"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The request subtests of status tests, skipped by name (see plan.go).
	if err := flag.Set("test.skip", SkipPattern()); err != nil {
		fmt.Fprintln(os.Stderr, "setting -test.skip:", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func writePlan(t *testing.T, all []suite.ConformanceTest) {
	claimed := sets.New(Claimed...)
	var entries []TestEntry
	for _, ct := range all {
		e := TestEntry{Name: ct.ShortName, Description: ct.Description, Provisional: ct.Provisional, Plan: "run"}
		for _, f := range ct.Features {
			e.Features = append(e.Features, string(f))
			if !claimed.Has(f) && !slices.Contains(e.Missing, string(f)) {
				e.Missing = append(e.Missing, string(f))
			}
		}
		if len(e.Missing) > 0 {
			e.Plan = "not-claimed"
		} else if r, ok := SkipTests[ct.ShortName]; ok {
			e.Plan, e.Reason = "skipped", r
		}
		entries = append(entries, e)
	}
	data, err := json.MarshalIndent(entries, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(env("CONFORMANCE_OUT", "."), "tests.json")
	if err := os.WriteFile(out, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// loopbackOnly refuses any request whose destination is not in 127.0.0.0/8: on this machine the
// suite may only talk to the ground. (With the plan's skips no request is made at all.)
type loopbackOnly struct{ next roundtripper.RoundTripper }

func (l loopbackOnly) CaptureRoundTrip(r roundtripper.Request) (*roundtripper.CapturedRequest, *roundtripper.CapturedResponse, error) {
	host := r.URL.Hostname()
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() || ip.To4() == nil {
		return nil, nil, fmt.Errorf("refused by the driver: %s is not in 127.0.0.0/8 (traffic leaves this machine only to the ground)", r.URL.Host)
	}
	return l.next.CaptureRoundTrip(r)
}

func ensureGatewayClass(t *testing.T, c client.Client, name, controller string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	gwc := &gatewayv1.GatewayClass{}
	err := c.Get(ctx, client.ObjectKey{Name: name}, gwc)
	if apierrors.IsNotFound(err) {
		gwc = &gatewayv1.GatewayClass{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       gatewayv1.GatewayClassSpec{ControllerName: gatewayv1.GatewayController(controller)},
		}
		err = c.Create(ctx, gwc)
		t.Logf("created GatewayClass %s (controllerName %s)", name, controller)
	}
	if err != nil {
		t.Fatalf("GatewayClass %s: %v", name, err)
	}
	if got := string(gwc.Spec.ControllerName); got != controller {
		t.Fatalf("GatewayClass %s has controllerName %s, want %s", name, got, controller)
	}
}

// podsReady waits until every pod in namespaces is Ready: the part of the stock Setup's final
// wait that does not depend on Gateways being Programmed.
func podsReady(t *testing.T, c client.Client, timeout time.Duration, namespaces []string) {
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), time.Second, timeout, true, func(ctx context.Context) (bool, error) {
		for _, ns := range namespaces {
			pods := &corev1.PodList{}
			if err := c.List(ctx, pods, client.InNamespace(ns)); err != nil {
				last = err.Error()
				return false, nil
			}
			for _, p := range pods.Items {
				ready := slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
					return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
				})
				if !ready && p.Status.Phase != corev1.PodSucceeded && p.DeletionTimestamp == nil {
					last = fmt.Sprintf("pod %s/%s not Ready (phase %s)", ns, p.Name, p.Status.Phase)
					return false, nil
				}
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("base manifests' pods not Ready after %s: %s", timeout, last)
	}
}

// logState logs the status of the Gateways and HTTPRoutes in the suite's namespaces: what the
// suite's address waits never print.
func logState(t *testing.T, c client.Client, test string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list := &gatewayv1.GatewayList{}
	if err := c.List(ctx, list, client.InNamespace("gateway-conformance-infra")); err != nil {
		t.Logf("%s%s: listing Gateways: %v", StatePrefix, test, err)
		return
	}
	routes := &gatewayv1.HTTPRouteList{}
	if err := c.List(ctx, routes); err != nil {
		t.Logf("%s%s: listing HTTPRoutes: %v", StatePrefix, test, err)
	}
	for _, r := range routes.Items {
		var parents []string
		for _, p := range r.Status.Parents {
			var conds []string
			for _, cd := range p.Conditions {
				conds = append(conds, fmt.Sprintf("%s=%s %s (gen %d/%d): %s", cd.Type, cd.Status, cd.Reason, cd.ObservedGeneration, r.Generation, cd.Message))
			}
			section := ""
			if p.ParentRef.SectionName != nil {
				section = "/" + string(*p.ParentRef.SectionName)
			}
			parents = append(parents, fmt.Sprintf("parent %s%s: %s", p.ParentRef.Name, section, strings.Join(conds, ", ")))
		}
		if len(parents) == 0 {
			parents = []string{"no parent status"}
		}
		t.Logf("%s%s: HTTPRoute %s/%s: %s", StatePrefix, test, r.Namespace, r.Name, strings.Join(parents, "; "))
	}
	for _, gw := range list.Items {
		var conds []string
		for _, cd := range gw.Status.Conditions {
			conds = append(conds, fmt.Sprintf("%s=%s %s (gen %d/%d)", cd.Type, cd.Status, cd.Reason, cd.ObservedGeneration, gw.Generation))
		}
		var addrs []string
		for _, a := range gw.Status.Addresses {
			addrs = append(addrs, a.Value)
		}
		var listeners []string
		for _, l := range gw.Status.Listeners {
			var lc []string
			for _, cd := range l.Conditions {
				if cd.Status != metav1.ConditionTrue || cd.Type == "Programmed" {
					lc = append(lc, fmt.Sprintf("%s=%s %s", cd.Type, cd.Status, cd.Reason))
				}
			}
			listeners = append(listeners, fmt.Sprintf("%s attachedRoutes=%d %s", l.Name, l.AttachedRoutes, strings.Join(lc, " ")))
		}
		t.Logf("%s%s: Gateway %s: %s; addresses [%s]; listeners: %s", StatePrefix, test, gw.Name,
			strings.Join(conds, ", "), strings.Join(addrs, ", "), strings.Join(listeners, "; "))
	}
}

func TestConformance(t *testing.T) {
	log.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(false)))
	cfg, err := config.GetConfig()
	if err != nil {
		t.Fatalf("kubeconfig: %v", err)
	}
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cs, err := clientset.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, install := range []func(*runtime.Scheme) error{v1alpha3.Install, v1alpha2.Install, v1beta1.Install, xv1alpha1.Install, gatewayv1.Install, apiextensionsv1.AddToScheme} {
		if err := install(c.Scheme()); err != nil {
			t.Fatal(err)
		}
	}

	className := env("CONFORMANCE_GATEWAY_CLASS", "picotun")
	ensureGatewayClass(t, c, className, env("CONFORMANCE_CONTROLLER_NAME", "tunnels.pico.sh/gateway-controller"))

	capTimeout, err := time.ParseDuration(env("CONFORMANCE_TIMEOUT", "30s"))
	if err != nil {
		t.Fatalf("CONFORMANCE_TIMEOUT: %v", err)
	}
	timeouts := conformanceconfig.DefaultTimeoutConfig()
	for _, d := range []*time.Duration{
		&timeouts.GatewayMustHaveAddress, &timeouts.GatewayMustHaveCondition, &timeouts.GatewayStatusMustHaveListeners,
		&timeouts.GatewayListenersMustHaveConditions, &timeouts.GWCMustBeAccepted, &timeouts.HTTPRouteMustNotHaveParents,
		&timeouts.HTTPRouteMustHaveCondition, &timeouts.RouteMustHaveParents, &timeouts.NamespacesMustBeReady,
		&timeouts.LatestObservedGenerationSet, &timeouts.DefaultTestTimeout, &timeouts.MaxTimeToConsistency,
	} {
		*d = min(*d, capTimeout)
	}
	// The suite logs every poll; 100ms makes megabytes of "not yet" per failing wait.
	timeouts.DefaultPollInterval = 500 * time.Millisecond

	labelKey, labelValue, _ := strings.Cut(env("CONFORMANCE_NAMESPACE_LABEL", "picotun.dev/conformance=true"), "=")
	supported := sets.New(Claimed...)
	var skip []string
	for name := range SkipTests {
		skip = append(skip, name)
	}
	opts := suite.ConformanceOptions{
		Client:               c,
		ClientOptions:        client.Options{},
		Clientset:            cs,
		RestConfig:           cfg,
		GatewayClassName:     className,
		RoundTripper:         loopbackOnly{&roundtripper.DefaultRoundTripper{TimeoutConfig: timeouts}},
		ManifestFS:           []fs.FS{&upstream.Manifests},
		NamespaceLabels:      map[string]string{labelKey: labelValue},
		CleanupBaseResources: false, // Setup runs in a subtest; cleanup would fire when it ends. The ground is thrown away.
		SupportedFeatures:    supported,
		TimeoutConfig:        timeouts,
		SkipTests:            skip,
	}
	cSuite, err := suite.NewConformanceTestSuite(opts)
	if err != nil {
		t.Fatalf("NewConformanceTestSuite: %v", err)
	}
	all := slices.Clone(tests.ConformanceTests)
	writePlan(t, all)
	// After a failed test, log the status of the Gateways left in the suite's namespace (the
	// base ones): what the suite's address waits never print.
	for i := range all {
		name, run := all[i].ShortName, all[i].Test
		all[i].Test = func(t *testing.T, s *suite.ConformanceTestSuite) {
			// On a failure, while the test's own objects still exist (its cleanup comes later).
			// Tests whose subtests run in parallel fail after this; their waits log what they saw.
			defer func() {
				if t.Failed() {
					logState(t, c, name)
				}
			}()
			run(t, s)
		}
	}

	// The stock Setup: GatewayClass Accepted, base manifests and Secrets applied, then every base
	// Gateway Accepted and Programmed and every pod Ready. Where the last wait fails, go on
	// with pods Ready only, and let each test say what its Gateways lack.
	t.Run("Setup", func(t *testing.T) {
		cSuite.Setup(t, all)
	})
	if cSuite.ControllerName == "" {
		t.Fatalf("stock Setup did not get past the GatewayClass (not Accepted by %s?)", className)
	}
	podsReady(t, c, capTimeout, []string{"gateway-conformance-infra", "gateway-conformance-app-backend", "gateway-conformance-web-backend"})

	if err := cSuite.Run(t, all); err != nil {
		t.Fatalf("suite.Run: %v", err)
	}
}
