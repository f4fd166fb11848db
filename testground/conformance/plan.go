// Package driver runs the upstream Gateway API conformance suite
// (sigs.k8s.io/gateway-api/conformance) against picotun on the test ground; see
// scripts/conformance and docs/conformance.md.
//
// This file is the plan: the features picotun claims, and every test or subtest that is not run,
// by name, with the reason. The driver (driver_test.go) and the report (cmd/report) both read it.
package driver

import (
	"regexp"
	"sort"
	"strings"

	"sigs.k8s.io/gateway-api/pkg/features"
)

// Claimed is what a tunnel implementation can claim: Gateways, HTTPRoutes attached to them, and
// ReferenceGrants for cross-namespace references. No extended feature: request matching beyond
// the host, filters, weights, mirrors, timeouts and the rest need a proxy in the data plane,
// and a tunnel server routes whole hosts.
var Claimed = []features.FeatureName{
	features.SupportGateway,
	features.SupportHTTPRoute,
	features.SupportReferenceGrant,
}

// Why a test or subtest is not run.
const (
	// A tunnel server (sish, tuns.sh) forwards every request for a name to the tunnel that holds
	// it; it cannot pick a backend by path, header, method or query parameter.
	ReasonMatching = "request matching beyond the host is not claimed: a tunnel server routes whole hosts " +
		"(every request for a name reaches the pods holding that tunnel), so path/header/method/query " +
		"matching between rules or routes cannot be honoured"
	ReasonFilters = "HTTPRoute filters (RequestRedirect, RequestHeaderModifier) are not claimed: a tunnel " +
		"server passes requests through unchanged, nothing on the path can redirect or rewrite them"
	ReasonWeight = "backendRef weights are not claimed: a tunnel name is served by one pod at a time, or spread " +
		"evenly by a load-balancing server (picotun reports WeightsUnsupported)"
	ReasonHTTPSCert = "TLS with the listener's certificateRefs is not claimable: the tunnel server terminates " +
		"TLS for its names with its own certificate, never the Secret's (and the request needs the data " +
		"plane, see the echo-backend reason)"
	// The data plane on this ground. A request "to the Gateway's address" is, for picotun, a
	// request to a name on the tunnel server, answered by the pod whose sidecar holds that tunnel.
	ReasonEchoBackend = "needs the data plane, not run on this ground yet: the suite sends requests to the " +
		"Gateway's address and expects its echo-basic backend to answer; here the base manifests' " +
		"backend pods run on kwok nodes (Running and Ready, but no container runs and no sidecar " +
		"reports a tunnel), a picotun Gateway's address is a name on the tunnel server (sish, " +
		"127.0.0.1:<its HTTP port>) that only a sidecar on the real node can open, and the suite's " +
		"RoundTripper dials the address directly -- the echo-basic image is not built for the real node " +
		"and the address is not mapped to the ground's sish yet"
	ReasonEcho500 = "needs the data plane, not run on this ground yet (see the echo-backend reason): the " +
		"request expects the Gateway to answer 500 for a rule whose backend is invalid; the status " +
		"half of this test runs"
	ReasonHostnameTraffic = "requests with Host headers and paths through the Gateway: needs the data " +
		"plane (see the echo-backend reason) and prefix-path matching (/s1, /s2 ...), which a tunnel " +
		"server cannot do; the status half of this test runs"
)

// Status tests a tunnel implementation answers differently on purpose, or that this ground cannot
// set up for picotun (see docs/conformance.md).
const (
	ReasonAddress = "waits for the Gateway to have an address before it checks the route: a picotun " +
		"Gateway's status.addresses lists only the public names its sidecars reported, and on this " +
		"ground the suite's backend pods (on kwok, not opted in, no webhook) carry no sidecar, so no " +
		"address ever comes; the route conditions checked after the wait were as the suite expects " +
		"in the run the details below come from"
	ReasonUninjected = "the routes select the suite's backend pods, which carry no sidecar on this ground " +
		"(they do not opt in and no webhook runs), so picotun says Programmed=False Pending for the " +
		"Gateway -- true, since nothing would serve them -- where the suite waits for Programmed"
	ReasonOneNamePerRoute = "two routes ask one listener for the same hostname: a tunnel name reaches one " +
		"set of pods, so picotun gives it to the oldest route and the other gets Accepted=False " +
		"TunnelConflict (a decision of issue 12), where the suite expects both routes attached"
	ReasonSecretsNotRead = "picotun never reads Secrets (the tunnel server terminates TLS with its own " +
		"certificate), so a missing or malformed Secret is not detected; the kind, group and " +
		"ReferenceGrant of a certificateRef are checked (those subtests run)"
)

// SkipTests: whole tests not run, by name. Tests whose features are not all Claimed are not run
// by the suite itself ("not supported") and are listed in the report with the features missing.
var SkipTests = map[string]string{
	// Core HTTPRoute traffic tests whose point is request matching or filters.
	"HTTPRouteExactPathMatching":     ReasonMatching,
	"HTTPRouteHeaderMatching":        ReasonMatching,
	"HTTPRouteMatching":              ReasonMatching,
	"HTTPRouteMatchingAcrossRoutes":  ReasonMatching,
	"HTTPRoutePathMatchOrder":        ReasonMatching,
	"HTTPRouteRedirectHostAndStatus": ReasonFilters,
	"HTTPRouteRequestHeaderModifier": ReasonFilters,
	"HTTPRouteWeight":                ReasonWeight,
	"HTTPRouteHTTPSListener":         ReasonHTTPSCert,
	// Traffic tests a tunnel implementation can pass once the data plane runs on the ground.
	"HTTPRouteSimpleSameNamespace":      ReasonEchoBackend,
	"HTTPRouteCrossNamespace":           ReasonEchoBackend,
	"HTTPRouteServiceTypes":             ReasonEchoBackend,
	"HTTPRouteListenerHostnameMatching": ReasonEchoBackend,
	// Status tests: see the reasons.
	"HTTPRouteInvalidBackendRefUnknownKind":             ReasonAddress,
	"HTTPRouteInvalidCrossNamespaceBackendRef":          ReasonAddress,
	"HTTPRouteInvalidNonExistentBackendRef":             ReasonAddress,
	"HTTPRouteInvalidReferenceGrant":                    ReasonAddress,
	"HTTPRoutePartiallyInvalidViaInvalidReferenceGrant": ReasonAddress,
	"HTTPRouteReferenceGrant":                           ReasonAddress,
	"GatewayModifyListeners":                            ReasonUninjected,
	"HTTPRouteHostnameIntersection":                     ReasonOneNamePerRoute,
}

// SubtestSkip is one subtest of a test that runs, not run because it sends requests.
type SubtestSkip struct {
	Test string
	// Subtest path below the test, as given to t.Run (before Go rewrites spaces to '_'); "*"
	// stands for every subtest at that level.
	Path   []string
	Reason string
}

// SkipSubtests: status/validation tests that also send requests. Their status subtests run;
// the request subtests are skipped by name (go test -skip).
var SkipSubtests = []SubtestSkip{
	{"GatewayInvalidTLSConfiguration", []string{"Nonexistent secret referenced as CertificateRef in a Gateway listener"}, ReasonSecretsNotRead},
	{"GatewayInvalidTLSConfiguration", []string{"Malformed secret referenced as CertificateRef in a Gateway listener"}, ReasonSecretsNotRead},
	{"GatewayWithAttachedRoutes", []string{"Gateway listener should have two valid http routes attached"}, ReasonOneNamePerRoute},
	{"GatewayWithAttachedRoutes", []string{"Gateway listener should have AttachedRoutes set even when Gateway has unresolved refs"}, ReasonSecretsNotRead},
	{"HTTPRouteInvalidBackendRefUnknownKind", []string{"HTTP Request to invalid backend with invalid Kind receives a 500"}, ReasonEcho500},
	{"HTTPRouteInvalidCrossNamespaceBackendRef", []string{"HTTP Request to invalid cross-namespace backend must receive a 500"}, ReasonEcho500},
	{"HTTPRouteInvalidNonExistentBackendRef", []string{"HTTP Request to invalid nonexistent backend receive a 500"}, ReasonEcho500},
	{"HTTPRouteInvalidReferenceGrant", []string{"Simple HTTP request not should reach web-backend"}, ReasonEcho500},
	{"HTTPRoutePartiallyInvalidViaInvalidReferenceGrant", []string{"HTTP Request to invalid backend with missing referenceGrant should receive a 500"}, ReasonEcho500},
	{"HTTPRoutePartiallyInvalidViaInvalidReferenceGrant", []string{"HTTP Request to valid sibling backend should succeed"}, ReasonEchoBackend},
	{"HTTPRouteReferenceGrant", []string{"Simple HTTP request should reach web-backend"}, ReasonEchoBackend},
	{"HTTPRouteReferenceGrant", []string{"Simple HTTP request should return 500 after deleting the relevant reference grant"}, ReasonEcho500},
	{"HTTPRouteHostnameIntersection", []string{"HTTPRoutes that do intersect with listener hostnames", "*"}, ReasonHostnameTraffic},
	{"HTTPRouteHostnameIntersection", []string{"HTTPRoutes that do not intersect with listener hostnames", "*"}, ReasonHostnameTraffic},
	{"HTTPRouteHostnameIntersection", []string{"HTTPRoutes intersects with an unspecified hostname listener", "*"}, ReasonHostnameTraffic},
}

// TopTest is the driver's test; the suite's tests are its subtests.
const TopTest = "TestConformance"

// StatePrefix starts the driver's log line "STATE <test>: <gateway status>" after a failed test.
const StatePrefix = "STATE "

// SkipPattern is the -test.skip expression for SkipSubtests (Go's syntax: alternatives joined
// by '|', each a '/'-separated regexp per name level, unanchored, so anchored here).
func SkipPattern() string {
	var alts []string
	for _, s := range SkipSubtests {
		elems := []string{"^" + TopTest + "$", "^" + regexp.QuoteMeta(s.Test) + "$"}
		for _, p := range s.Path {
			if p == "*" {
				elems = append(elems, ".")
			} else {
				elems = append(elems, "^"+regexp.QuoteMeta(Rewrite(p))+"$")
			}
		}
		alts = append(alts, strings.Join(elems, "/"))
	}
	sort.Strings(alts)
	return strings.Join(alts, "|")
}

// Rewrite is what Go's testing does to a subtest name: spaces become underscores.
func Rewrite(name string) string { return strings.ReplaceAll(name, " ", "_") }

// Subtests of test that SkipSubtests names.
func SubtestsSkipped(test string) []SubtestSkip {
	var out []SubtestSkip
	for _, s := range SkipSubtests {
		if s.Test == test {
			out = append(out, s)
		}
	}
	return out
}

// Reasons, in the order the report explains them, with a short key for its tables.
var Reasons = []struct{ Key, Text string }{
	{"matching", ReasonMatching},
	{"filters", ReasonFilters},
	{"weights", ReasonWeight},
	{"https-cert", ReasonHTTPSCert},
	{"echo-backend", ReasonEchoBackend},
	{"echo-500", ReasonEcho500},
	{"hostname-traffic", ReasonHostnameTraffic},
	{"address", ReasonAddress},
	{"uninjected", ReasonUninjected},
	{"one-name-per-route", ReasonOneNamePerRoute},
	{"secrets-not-read", ReasonSecretsNotRead},
}

// ReasonKey is the short key of a reason text ("" when it is not one of Reasons).
func ReasonKey(text string) string {
	for _, r := range Reasons {
		if r.Text == text {
			return r.Key
		}
	}
	return ""
}

// TestEntry is one line of tests.json: what the plan did with a test of the suite.
type TestEntry struct {
	Name        string   `json:"name"`
	Description string   `json:"description"`
	Features    []string `json:"features"`
	Provisional bool     `json:"provisional,omitempty"`
	// "run", "skipped" (SkipTests) or "not-claimed" (features picotun does not claim).
	Plan    string   `json:"plan"`
	Reason  string   `json:"reason,omitempty"`
	Missing []string `json:"missing,omitempty"`
}
