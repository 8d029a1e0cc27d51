package dispatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/sendonce/sendonce/store"
)

// Rule settles in-doubt emails automatically: an email that has been in
// doubt for at least After (since its record last changed) gets Action.
// When several rules match one email, the one with the longest After wins,
// so "resend after 1h, fail after 24h" escalates.
type Rule struct {
	After  time.Duration
	Action store.Action
	// Tenant limits the rule to one tenant; empty means every tenant.
	Tenant string
	// MaxAttempts stops a resend rule once the email has had this many
	// attempts, so an upstream that always loses its answer cannot make a
	// rule resend for ever; a longer fail rule can then take over.
	// 0 means DefaultRuleMaxAttempts. Ignored by mark_sent and fail.
	MaxAttempts int
}

// DefaultRuleMaxAttempts is Rule.MaxAttempts when it is 0.
const DefaultRuleMaxAttempts = 3

// Actor is what the rule records as who resolved an email
// ("rule:resend-after-24h"), so an operator can tell a rule's decision
// from a person's.
func (r Rule) Actor() string {
	s := "rule:" + string(r.Action) + "-after-" + shortDuration(r.After)
	if r.Tenant != "" {
		s += "-tenant-" + r.Tenant
	}
	return s
}

// shortDuration writes 24h rather than 24h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// ValidateRules checks rules, naming the rule and the fix.
func ValidateRules(rules []Rule) error {
	var errs []error
	for i, r := range rules {
		if r.After <= 0 {
			errs = append(errs, fmt.Errorf("in-doubt rule %d: after is %v; use a positive duration like 24h", i, r.After))
		}
		if !r.Action.Valid() {
			errs = append(errs, fmt.Errorf("in-doubt rule %d: action %q is not an action; use resend, mark_sent or fail", i, r.Action))
		}
		if r.MaxAttempts < 0 {
			errs = append(errs, fmt.Errorf("in-doubt rule %d: max_attempts is %d; use a positive number, or 0 for %d", i, r.MaxAttempts, DefaultRuleMaxAttempts))
		}
	}
	return errors.Join(errs...)
}

// RulesConfig configures the in-doubt rules loop.
type RulesConfig struct {
	Store store.Store
	Rules []Rule
	// Resolve applies one decision; the Client passes its own Resolve, so
	// a rule's decision is logged, counted and wakes the dispatcher like an
	// operator's.
	Resolve func(ctx context.Context, tenant, key string, a store.Action, actor string) (store.Record, error)
	// Every is the pause between passes. Default 1 minute.
	Every  time.Duration
	Now    func() time.Time
	Logger *slog.Logger
}

func (c *RulesConfig) defaults() {
	if c.Every == 0 {
		c.Every = time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	for i := range c.Rules {
		if c.Rules[i].MaxAttempts == 0 {
			c.Rules[i].MaxAttempts = DefaultRuleMaxAttempts
		}
	}
}

// RunRules applies the rules every c.Every until ctx ends. Several nodes
// may run it at once: Resolve succeeds only on an email still in doubt, so
// each email is decided once.
func RunRules(ctx context.Context, c RulesConfig) {
	c.defaults()
	t := time.NewTicker(c.Every)
	defer t.Stop()
	for {
		if _, err := ApplyRules(ctx, c); err != nil && ctx.Err() == nil {
			c.Logger.Warn("in-doubt rules: pass failed; trying again at the next", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ApplyRules makes one pass over every in-doubt email and returns how many
// it resolved.
func ApplyRules(ctx context.Context, c RulesConfig) (int, error) {
	c.defaults()
	if len(c.Rules) == 0 {
		return 0, nil
	}
	now := c.Now()
	resolved := 0
	f := store.Filter{Tenant: store.AllTenants, State: store.StateInDoubt, Oldest: true, Limit: store.MaxListLimit}
	for {
		p, err := c.Store.List(ctx, f)
		if err != nil {
			return resolved, fmt.Errorf("in-doubt rules: list: %w", err)
		}
		for _, r := range p.Records {
			rule, ok := pickRule(c.Rules, r, now)
			if !ok {
				continue
			}
			_, err := c.Resolve(ctx, r.Tenant, r.Key, rule.Action, rule.Actor())
			switch {
			case err == nil:
				resolved++
			case errors.Is(err, store.ErrInvalidState), errors.Is(err, store.ErrNotFound):
				// Someone resolved it, or a late answer settled it, meanwhile.
			default:
				return resolved, fmt.Errorf("in-doubt rules: resolve %q: %w", r.Key, err)
			}
		}
		if p.Next == "" {
			return resolved, nil
		}
		f.Cursor = p.Next
	}
}

// pickRule is the matching rule with the longest After, if any.
func pickRule(rules []Rule, r store.Record, now time.Time) (Rule, bool) {
	var best Rule
	found := false
	inDoubt := now.Sub(r.UpdatedAt)
	for _, rule := range rules {
		switch {
		case rule.Tenant != "" && rule.Tenant != r.Tenant:
		case inDoubt < rule.After:
		case rule.Action == store.ActionResend && r.Attempts >= rule.MaxAttempts:
		case !found || rule.After > best.After:
			best, found = rule, true
		}
	}
	return best, found
}
